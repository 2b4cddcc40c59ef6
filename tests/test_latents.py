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
