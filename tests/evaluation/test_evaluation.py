import numpy as np
import pytest
import torch

from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.errors import LatentflowError
from latentflow.evaluation import (
    DigitNet,
    FDStats,
    InceptionNet,
    evaluate_images,
    fd_with_spread,
    feature_net,
    matched_fd,
    references_for_run,
)
from latentflow.metrics import frechet_distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: FD = |shift|^2
    assert frechet_distance(a, a + [3.0, 0.0, 4.0]) == pytest.approx(25.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, 2 * rng.normal(size=(20_000, 3))) == pytest.approx(3.0, rel=0.05)


def test_spread_and_sample_size():
    """The bootstrap spread shrinks with more samples; FD at a smaller size is larger (its
    bias), which is why the floor is compared at its own size."""
    rng = np.random.default_rng(1)
    ref = FDStats.of(rng.normal(size=(50_000, 8)), "toy", "toy")
    small, large = rng.normal(size=(500, 8)), rng.normal(size=(5000, 8))
    (fd_s, sd_s), (fd_l, sd_l) = fd_with_spread(small, ref), fd_with_spread(large, ref)
    assert sd_l < sd_s and fd_l < fd_s
    matched = matched_fd(large, ref, 500)
    assert matched["subsets"] == 10 and matched["std"] > 0 and matched["fd"] > 2 * fd_l  # 500 samples: more bias
    assert abs(matched["fd"] - fd_s) < 3 * matched["std"]  # one set of 500 is one draw of that spread


def test_stats_files_round_trip_and_bad_ones_are_one_line(tmp_path):
    rng = np.random.default_rng(2)
    stats = FDStats.of(rng.normal(size=(100, 4)), "digits@abc", "toy")
    loaded = FDStats.load(stats.save(tmp_path / "ref.npz"))
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert (loaded.n, loaded.feature_net, loaded.description) == (100, "digits@abc", "toy")
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    with pytest.raises(LatentflowError, match="not an FD statistics file of latentflow; make one with"):
        FDStats.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(LatentflowError, match="not an FD statistics file"):
        FDStats.load(tmp_path / "text.npz")


@pytest.fixture(scope="module")
def digits():
    return DigitNet()


def test_the_digit_net_ships_its_references_and_tells_real_digits_from_noise(digits):
    refs = references_for_run(DataConfig(), digits, channels=1)
    assert [r["name"] for r in refs] == ["mnist-test", "mnist-train"]
    assert refs[0]["stats"].n == 10_000 and refs[1]["stats"].n == 60_000 and refs[0]["real"].shape == (10_000, 128)
    assert len(refs[0]["floor"]) == 4500  # the floor: the bundled digits a default model trains on
    assert digits.test_accuracy > 0.99
    test = build_dataset(DataConfig(split="test", max_items=500), channels=1)
    images, labels = test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy()
    real = evaluate_images(images, labels, digits, refs)
    assert real["accuracy"] >= 0.98
    assert evaluate_images(images, np.roll(labels, 1), digits, refs[:1])["accuracy"] < 0.2
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    fake = evaluate_images(noise, labels, digits, refs[:1])
    assert fake["references"]["mnist-test"]["fd"] > 10 * real["references"]["mnist-test"]["fd"]
    test_ref = real["references"]["mnist-test"]
    assert test_ref["floor"]["n"] == test_ref["matched"]["n"] == 500 and test_ref["fd_std"] > 0  # at equal size
    assert test_ref["ratio"] < 1.5  # real digits score like the model's training data
    pr = real["precision_recall"]
    assert pr["n"] == 500 and pr["precision"] > 0.7 and pr["recall"] > 0.7 and pr["floor"]["n"] == 500
    assert fake["precision_recall"]["precision"] < 0.05  # noise is nowhere near a digit
    unlabelled = evaluate_images(images, np.full_like(labels, -1), digits, refs[:1])
    assert "accuracy" not in unlabelled


def test_the_earlier_pooled_net_is_kept_with_the_run_data_protocol():
    pooled = feature_net("digits-pooled")
    assert pooled.name == "digits-pooled" and pooled.identity.startswith("digits-pooled@")
    refs = references_for_run(DataConfig(), pooled, channels=1)
    assert [r["name"] for r in refs] == ["train", "held-out"] and refs[0]["stats"].n == 4500


def test_a_feature_net_that_does_not_fit_the_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    faces = DataConfig(source="folder", path="faces", image_size=64)
    with pytest.raises(
        LatentflowError,
        match=r"no feature net fits this data: the digit classifier knows only "
        r"MNIST digits.*weights-inception-2015-12-05-6726825d.pth",
    ):
        feature_net("auto", faces, channels=3, image_size=64)
    with pytest.raises(LatentflowError, match="feature_net_choice digits: the digit classifier knows only MNIST"):
        feature_net("digits", faces, flag="feature_net_choice")  # asked for by name: still refused, in its words
    assert isinstance(feature_net("auto", DataConfig()), DigitNet)


def test_inception_features_are_used_when_their_weights_are_local(tmp_path, monkeypatch):
    """A randomly initialised Inception-v3 saved where torch-fidelity's weights go stands in
    for the real file (no download here): the loading code and the 2048-d features run."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "dummy.pth").write_bytes(b"")
    monkeypatch.setattr(torch, "load", lambda *a, **k: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    random_net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "dummy.pth")
    )
    monkeypatch.undo()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    InceptionNet.weights_path().parent.mkdir(parents=True)
    torch.save(random_net.state_dict(), InceptionNet.weights_path())
    net = feature_net("auto", DataConfig(source="folder", path="faces", image_size=64), channels=3, image_size=64)
    assert isinstance(net, InceptionNet) and net.identity.startswith("inception-v3@")
    features, predictions = net.run(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    assert features.shape == (3, 2048) and predictions is None
