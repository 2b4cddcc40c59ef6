import pytest
import torch
from torch.utils.data import DataLoader

from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.latents import cache_metadata, load_or_build_cache
from latentflow.vae import FrozenVAE
from tests.conftest import make_tiny_vae


@pytest.fixture
def dataset():
    return build_dataset(DataConfig(max_items=40), channels=1)


def test_cache_pairs_latents_with_their_labels_after_shuffling(tmp_path, tiny_vae_dir, dataset, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator, batch_size=16)
    loader = DataLoader(cache, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for mean, std, labels, index in loader:
        assert torch.equal(labels, dataset.labels[index])
        images = torch.stack([dataset[i][0] for i in index.tolist()])
        ref_mean, ref_std = vae.encode(images)
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(std, ref_std, atol=1e-5, rtol=1e-4)
        seen += index.tolist()
    assert sorted(seen) == list(range(len(dataset))) and seen != sorted(seen)


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tiny_vae_dir, dataset, accelerator, capsys):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    _, path = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    assert "encoding 40 images" in capsys.readouterr().out
    _, again = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    assert again == path and "using latent cache" in capsys.readouterr().out

    other_vae = FrozenVAE.from_pretrained(str(make_tiny_vae(tmp_path / "v2", seed=3)))
    _, other = load_or_build_cache(other_vae, dataset, tmp_path, accelerator)
    assert other != path  # another VAE never reads this cache
    other_data = build_dataset(DataConfig(max_items=30), channels=1)
    assert cache_metadata(vae, other_data)["dataset"] != cache_metadata(vae, dataset)["dataset"]

    path.write_bytes(b"half-written")  # a damaged file is rebuilt, not trusted
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    assert "rebuilding" in capsys.readouterr().out and len(cache) == 40


def test_stale_metadata_is_detected(tmp_path, tiny_vae_dir, dataset, accelerator):
    from latentflow.latents import _read

    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    _, path = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    meta = cache_metadata(vae, dataset)
    assert _read(path, meta)[0] is not None
    cache, why = _read(path, {**meta, "scaling_factor": "9.0", "image_shape": "[1, 64, 64]"})
    assert cache is None and why == "it was made with different image_shape, scaling_factor"


def test_a_tampered_cache_is_rebuilt(tmp_path, tiny_vae_dir, dataset, accelerator, capsys):
    from safetensors.torch import load_file, safe_open, save_file

    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    _, path = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for name, damage in (("mean", lambda t: t["mean"].view(-1)[5:9].fill_(float("nan"))),
                         ("labels", lambda t: t["labels"].__setitem__(3, 99))):
        tensors = load_file(str(path))
        damage(tensors)
        save_file(tensors, str(path), metadata=meta)
        capsys.readouterr()
        cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator)
        why = "it holds non-finite moments" if name == "mean" else "its labels differ from the dataset's"
        assert f"is stale: {why}; rebuilding" in capsys.readouterr().out
        assert torch.isfinite(cache.mean).all() and torch.equal(cache.labels, dataset.labels)


def test_a_cache_dir_that_is_a_file_or_a_vae_that_encodes_nan(tmp_path, tiny_vae_dir, dataset, accelerator):
    from latentflow.errors import DataError

    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; pass --cache-dir DIR"):
        load_or_build_cache(vae, dataset, tmp_path / "file", accelerator)
    with torch.no_grad():
        vae.autoencoder.encoder.conv_in.weight.fill_(float("nan"))
    vae._identity = None
    with pytest.raises(DataError, match=r"encodes 40 of 40 images to non-finite latents"):
        load_or_build_cache(vae, dataset, tmp_path / "cache", accelerator)


def test_batches_are_seeded_sharded_and_a_pure_function_of_the_step(tiny_vae_dir, dataset, tmp_path, accelerator):
    from latentflow.latents import LatentBatches

    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    ranks = [LatentBatches(cache, batch_size=4, num_processes=2, rank=r, grad_accum=2, seed=3) for r in (0, 1)]
    assert ranks[0].iterations_per_epoch == 40 // (4 * 2 * 2)
    for epoch in (0, 1):
        seen = torch.cat([b.indices(epoch, i, m) for i in range(2) for m in range(2) for b in ranks])
        assert len(set(seen.tolist())) == 32  # no row twice within an epoch, across ranks
    assert not torch.equal(ranks[0].indices(0, 0), ranks[0].indices(1, 0))  # a new order each epoch
    again = LatentBatches(cache, batch_size=4, num_processes=2, rank=1, grad_accum=2, seed=3)
    assert torch.equal(again.indices(1, 1, 1), ranks[1].indices(1, 1, 1))  # no state: resume anywhere
    mean, std, labels = ranks[0].batch(0, 1)
    idx = ranks[0].indices(0, 1)
    assert torch.equal(mean, cache.mean[idx]) and torch.equal(labels, dataset.labels[idx])
    tiny = LatentBatches(cache, batch_size=64, num_processes=2)  # smaller than one global batch: wraps
    assert tiny.iterations_per_epoch == 1 and len(tiny.indices(0, 0)) == 64
