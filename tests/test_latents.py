import json
import mmap
import signal
import struct
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentflow.commands import TERMINAL
from latentflow.config import DataConfig, VAEConfig
from latentflow.data import build_dataset
from latentflow.errors import DataError
from latentflow.latents import LatentBatches, cache_metadata, load_or_build_cache
from latentflow.vae import FrozenVAE
from tests.conftest import LAUNCH, SMOKE, make_tiny_vae, run_main


@pytest.fixture
def dataset():
    return build_dataset(DataConfig(max_items=40), channels=1)


def shards(vae_cfg_size=16):
    return VAEConfig(encode_batch_size=8, cache_shard_size=vae_cfg_size)


def test_cache_pairs_latents_with_their_labels_in_any_order(tmp_path, tiny_vae_dir, dataset, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    cache, root = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".safetensors") == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]  # 16 + 16 + 8
    index = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    mean, std, labels = cache.gather(index)
    assert torch.equal(labels, dataset.labels[cache.indices[index]]) and torch.equal(cache.indices, torch.arange(40))
    images = torch.stack([dataset[i][0] for i in index.tolist()])
    ref_mean, ref_std = vae.encode(images)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, ref_std, atol=1e-5, rtol=1e-4)


def test_shards_are_memory_mapped(tmp_path, tiny_vae_dir, dataset, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    for shard in cache.shards:
        assert isinstance(shard.moments.base, mmap.mmap)  # a view of the file, not a copy in memory
    before = cache.gather(torch.arange(40))[0]
    for shard in cache.shards:
        shard.release()  # drop the mapped pages: reading again gives the same rows
    assert torch.equal(cache.gather(torch.arange(40))[0], before)


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tiny_vae_dir, dataset, accelerator, capsys):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    _, root = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    assert "encoding 40 images" in capsys.readouterr().out
    _, again = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    assert again == root and "using latent cache" in capsys.readouterr().out

    other_vae = FrozenVAE.from_pretrained(str(make_tiny_vae(tmp_path / "v2", seed=3)))
    _, other = load_or_build_cache(other_vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    assert other != root  # another VAE never reads this cache
    other_data = build_dataset(DataConfig(max_items=30), channels=1)
    assert cache_metadata(vae, other_data)["dataset"] != cache_metadata(vae, dataset)["dataset"]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda root: (root / "shard_00001.safetensors").write_bytes(b"half-written"), "shard 1: it cannot be read"),
        ("nan", "shard 1: it holds non-finite moments"),
        ("labels", "shard 1: its labels differ from the dataset's"),
        (
            lambda root: (root / "shard_00001.done").write_text(json.dumps({"rows": 3, "bad": []})),
            "shard 1: it holds 16 rows, its marker says 3",
        ),
        (  # a header of a megabyte of brackets: bounded, never a RecursionError
            lambda root: (root / "shard_00001.safetensors").write_bytes(
                struct.pack("<Q", 1 << 20) + b"[" * (1 << 19) + b"]" * (1 << 19)
            ),
            "shard 1: it cannot be read (BoundsError",
        ),
        (lambda root: (root / "shard_00001.done").write_text("[1]"), "shard 1: its marker is not a latentflow"),
    ],
    ids=["truncated", "nan", "labels", "marker", "bracket-header", "list-marker"],
)
def test_a_damaged_shard_is_encoded_again(tmp_path, tiny_vae_dir, dataset, accelerator, capsys, damage, message):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    good, root = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    expected = good.mean
    path = root / "shard_00001.safetensors"
    if damage in ("nan", "labels"):
        tensors = load_file(str(path))
        if damage == "nan":
            tensors["moments"].view(-1)[5:9] = float("nan")
        else:
            tensors["labels"][3] = 99
        save_file(tensors, str(path))
    else:
        damage(root)
    capsys.readouterr()
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    assert f"encoding 1 shard(s) again ({message}" in capsys.readouterr().out
    assert torch.equal(cache.mean, expected)


def test_a_stale_manifest_is_rebuilt(tmp_path, tiny_vae_dir, dataset, accelerator, capsys):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    _, root = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["metadata"]["image_shape"] = "[1, 64, 64]"
    for text in (json.dumps(manifest), "[" * 100_000 + "]" * 100_000):  # stale, then hostile (100 000 deep)
        (root / "manifest.json").write_text(text)
        capsys.readouterr()
        cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
        out = capsys.readouterr().out
        assert "its manifest does not match; encoding it again" in out and "encoding 40 images" in out
        assert len(cache) == 40


def test_a_cache_dir_that_is_a_file_or_a_vae_that_encodes_nan(tmp_path, tiny_vae_dir, dataset, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; pass --cache-dir DIR"):
        load_or_build_cache(vae, dataset, tmp_path / "file", accelerator)
    with torch.no_grad():
        vae.autoencoder.encoder.conv_in.weight.fill_(float("nan"))
    vae._identity = None
    with pytest.raises(DataError, match=r"encodes 40 of 40 images of shard 0 to non-finite latents"):
        load_or_build_cache(vae, dataset, tmp_path / "cache", accelerator)


def test_half_precision_storage_and_its_error(tmp_path, tiny_vae_dir, dataset, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    full, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator)
    for dtype, bound in (("bfloat16", 2**-8), ("float16", 2**-11)):
        half, root = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=VAEConfig(cache_dtype=dtype))
        normal = full.mean.abs() > 1e-3  # below, float16 is subnormal: its error is absolute
        rel = ((half.mean - full.mean).abs() / full.mean.abs())[normal].max()
        assert 0 < rel <= bound  # round to nearest: half a unit in the last place at most
        assert float((half.mean - full.mean).abs()[~normal].sum()) < 1e-6 * max(1, int((~normal).sum()))
        assert sum(p.stat().st_size for p in root.glob("*.safetensors")) < 0.6 * 40 * 2 * 4 * 64 * 4


def test_batches_are_seeded_sharded_and_a_pure_function_of_the_step(tiny_vae_dir, dataset, tmp_path, accelerator):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    cache, _ = load_or_build_cache(vae, dataset, tmp_path, accelerator, vae_cfg=shards(), console=TERMINAL)
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


ENCODE = ["encode", "--config", SMOKE, "--set", "data.max_items=300", "--set", "vae.cache_shard_size=64"]


@pytest.mark.slow
def test_an_interrupted_encode_resumes_at_the_unfinished_shards(tmp_path):
    env = {"LATENTFLOW_CACHE": str(tmp_path)}
    killed = run_main(*ENCODE, env={**env, "LATENTFLOW_FAULTS": "encode_sigkill=2"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    (root,) = tmp_path.iterdir()
    assert sorted(p.name for p in root.glob("*.done")) == ["shard_00000.done", "shard_00001.done"]
    again = run_main(*ENCODE, env=env)
    assert "resuming the encode" in again.stdout and "2 of 5 shards are done" in again.stdout


@pytest.mark.slow
def test_two_processes_encode_the_same_cache_as_one(tmp_path):
    one = run_main(*ENCODE, env={"LATENTFLOW_CACHE": str(tmp_path / "one"), "OMP_NUM_THREADS": "1"})
    assert "1 process(es)" in one.stdout
    two = subprocess.run(
        [*LAUNCH, *ENCODE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "LATENTFLOW_CACHE": str(tmp_path / "two")},
    )
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    a, b = (
        sorted((tmp_path / "one").glob("*/shard_*.safetensors")),
        sorted((tmp_path / "two").glob("*/shard_*.safetensors")),
    )
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        tx, ty = load_file(str(x)), load_file(str(y))
        assert all(torch.equal(tx[k], ty[k]) for k in ("moments", "labels", "indices")), x.name
