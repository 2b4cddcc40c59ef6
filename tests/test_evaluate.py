import numpy as np
import pytest

from latentflow.classifier import load_classifier
from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.evaluate import evaluate_images, frechet_distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: FD = |shift|^2
    assert frechet_distance(a, a + [3.0, 0.0, 4.0]) == pytest.approx(25.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, 2 * rng.normal(size=(20_000, 3))) == pytest.approx(3.0, rel=0.05)


@pytest.fixture(scope="module")
def real_test_digits():
    ds = build_dataset(DataConfig(split="test", max_items=200), channels=1)
    return ds.images.permute(0, 2, 3, 1).numpy(), ds.labels.numpy()


def test_shipped_classifier_judges_real_digits(real_test_digits):
    images, labels = real_test_digits
    classifier, info = load_classifier()
    assert info["test_accuracy"] >= 0.97
    result = evaluate_images(images, labels, classifier)
    assert result["accuracy"] >= 0.95
    # real held-out digits sit close to the reference; shuffled labels and noise do not
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert evaluate_images(images, np.roll(labels, 1), classifier)["accuracy"] < 0.2
    assert evaluate_images(noise, labels, classifier)["fd"] > 10 * result["fd"]


def test_unlabelled_samples_get_fd_only(real_test_digits):
    images, labels = real_test_digits
    result = evaluate_images(images, np.full_like(labels, -1))
    assert "accuracy" not in result and result["fd"] >= 0


def test_benchmark_runs_and_reports_sane_numbers(tmp_path):
    """Not a timing test: the benchmark runs on tiny models and its numbers are consistent."""
    import json

    from latentflow.cli import main

    assert main(["bench", "--tiny", "--cpu", "--batches", "8,16", "--seed-batch", "8", "--window-seconds", "0.2",
                 "--windows", "2", "--json", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows)[0].startswith("(a) seed") and len(rows) >= 5
    for r in rows.values():
        assert r["images_per_s"] > 0 and 0 < r["fraction_of_peak"] < 5 and r["peak_memory_mb"] > 0
        assert abs(r["dit_gflops_per_s"] - r["images_per_s"] * report["train_gflop_per_image"]) < 1e-6 * r["dit_gflops_per_s"] + 1e-9
    assert report["matmul_peak_gflops"]["fp32"] > 0 and report["best"]["speedup_vs_seed"] > 0
