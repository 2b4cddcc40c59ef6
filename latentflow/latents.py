"""The latent cache: a dataset encoded once by the frozen VAE.

For every image the cache keeps the posterior mean and standard deviation (VAE space),
the label and the image's index in the dataset. Training draws a fresh latent from the
posterior at every step, ``z = mean + std * eps`` (what ``latent_dist.sample()`` does),
instead of freezing one sample. Entries are keyed by dataset index, so shuffling cannot
pair a latent with another image's label.

The file is ``<cache_dir>/latents-<key>.safetensors``, where ``key`` hashes the metadata
(VAE identity, scale/shift, image size, dataset fingerprint, format version); the same
metadata is stored inside the file and checked on load. A file whose metadata differs or
that cannot be read is rebuilt, with a message saying why; so is one whose values are not
finite or whose labels no longer match the dataset. Only the main process encodes and
writes (atomically); the others wait and then read.

``LatentBatches`` turns the cache into training batches: a seeded permutation per epoch,
cut into global batches of ``processes x batch_size`` that each rank slices, so a step's
batch is a pure function of (seed, epoch, iteration, rank). Resuming mid-epoch is starting
the loop at an iteration; nothing else needs restoring.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.utils.data import DataLoader, Dataset

from .data import ImageDataset
from .errors import DataError
from .runtime import STREAM_DATA, atomic_file, derive_seed, on_main
from .vae import FrozenVAE

__all__ = [
    "LatentBatches",
    "LatentCache",
    "cache_metadata",
    "default_cache_dir",
    "encode_dataset",
    "load_or_build_cache",
]

CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """$LATENTFLOW_CACHE, else ~/.cache/latentflow (shared by all runs, like the HF cache)."""
    return Path(os.environ.get("LATENTFLOW_CACHE", Path.home() / ".cache" / "latentflow")).expanduser()


class LatentCache(Dataset):
    """Posterior moments (N, c, h, w), labels (N,) and dataset indices (N,)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        self.mean, self.std, self.labels, self.indices = mean, std, labels.long(), indices.long()

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mean[i], self.std[i], self.labels[i], self.indices[i]

    def gather(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Moments (B, c, h, w) x 2 and labels (B,) of cache rows ``idx`` (B,), in one gather."""
        return self.mean[idx], self.std[idx], self.labels[idx]

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(self.mean.shape[1:])


def cache_metadata(vae: FrozenVAE, dataset: ImageDataset) -> Dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "vae": vae.identity,
        "scale": json.dumps(vae.scale(torch.zeros(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "unit": json.dumps(vae.scale(torch.ones(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "image_shape": json.dumps(list(dataset.image_shape)),
        "dataset": dataset.fingerprint(),
        "num_items": str(len(dataset)),
    }


@torch.no_grad()
def encode_dataset(
    vae: FrozenVAE, dataset: ImageDataset, batch_size: int = 256, progress: Optional[Callable] = None
) -> LatentCache:
    """Encode every image in dataset order (no shuffling, no augmentation)."""
    # An explicit generator: iterating a DataLoader otherwise draws from the global one, and
    # a run would then depend on whether its cache already existed.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    means, stds, labels, indices = [], [], [], []
    for images, y, idx in progress(loader) if progress else loader:
        mean, std = vae.encode(images)  # (B, c, h, w) each
        means.append(mean.cpu())
        stds.append(std.cpu())
        labels.append(y)
        indices.append(idx)
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(labels), torch.cat(indices))


def _check(cache: LatentCache, dataset: Optional[ImageDataset]) -> str:
    """Why a cache that read fine cannot be trusted, or ""."""
    if not (torch.isfinite(cache.mean).all() and torch.isfinite(cache.std).all()):
        return "it holds non-finite moments"
    if dataset is not None:
        if len(cache) != len(dataset) or not torch.equal(cache.indices, torch.arange(len(dataset))):
            return "its rows do not cover the dataset"
        if not torch.equal(cache.labels, dataset.labels):
            return "its labels differ from the dataset's"
    return ""


def _read(path: Path, metadata: Dict[str, str], dataset: Optional[ImageDataset] = None) -> Tuple[Optional[LatentCache], str]:
    """-> (cache, "") if the file is usable, else (None, why not)."""
    if not path.exists():
        return None, ""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
        if stored != metadata:
            diff = sorted(k for k in set(stored) | set(metadata) if stored.get(k) != metadata.get(k))
            return None, f"it was made with different {', '.join(diff)}"
        t = load_file(str(path))
        cache = LatentCache(t["mean"], t["std"], t["labels"], t["indices"])
    except (SafetensorError, OSError, KeyError) as exc:
        return None, f"it cannot be read ({exc})"
    why = _check(cache, dataset)
    return (None, why) if why else (cache, "")


def load_or_build_cache(
    vae: FrozenVAE,
    dataset: ImageDataset,
    cache_dir: Path,
    accelerator,
    batch_size: int = 256,
    progress: Optional[Callable] = None,
) -> Tuple[LatentCache, Path]:
    """Reuse the cache whose metadata matches, or encode the dataset (main process) and save it.
    A failure on the main process (a VAE that encodes to NaN, a full or read-only cache
    directory) fails every rank with the same one-line error."""
    metadata = cache_metadata(vae, dataset)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.safetensors"

    def build() -> None:
        if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise DataError(f"cache directory {cache_dir} is a file; pass --cache-dir DIR (a directory)")
        cache, why = _read(path, metadata, dataset)
        if cache is not None:
            accelerator.print(f"using latent cache {path}")
            return
        accelerator.print(
            f"latent cache {path} is stale: {why}; rebuilding" if why else f"encoding {len(dataset)} images into {path}"
        )
        cache = encode_dataset(vae, dataset, batch_size, progress)
        if _check(cache, None):
            bad = (~torch.isfinite(cache.mean.flatten(1)).all(1) | ~torch.isfinite(cache.std.flatten(1)).all(1)).nonzero()
            raise DataError(
                f"VAE {vae.name} encodes {len(bad)} of {len(dataset)} images to non-finite latents "
                f"(first: item {int(bad[0])} of {dataset.origin}); check the VAE's weights and the images"
            )
        tensors = {"mean": cache.mean, "std": cache.std, "labels": cache.labels, "indices": cache.indices}
        needed = sum(t.nbytes for t in tensors.values())
        with atomic_file(path, "latent cache", needed, intact="no cache was written") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    on_main(accelerator, build)
    cache, why = _read(path, metadata, dataset)
    if cache is None:
        raise DataError(f"latent cache {path} is unusable right after it was written ({why}); pass another --cache-dir")
    return cache, path


class LatentBatches:
    """Seeded, rank-sharded batches of cache rows.

    Epoch ``e`` visits the rows in the order of a permutation seeded by (seed, e), the same
    on every rank. Optimizer step ``i`` of the epoch takes the next ``grad_accum`` global
    batches of ``processes x batch_size`` rows, and rank ``r`` takes the ``r``-th slice of
    each. Steps per epoch are ``N // (processes x batch_size x grad_accum)``, at least one
    (a dataset smaller than a global batch wraps around).
    """

    def __init__(self, cache: LatentCache, batch_size: int, num_processes: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0):
        self.cache, self.batch_size, self.num_processes, self.rank = cache, batch_size, num_processes, rank
        self.grad_accum, self.seed = grad_accum, seed
        self.global_batch = batch_size * num_processes
        self.iterations_per_epoch = max(1, len(cache) // (self.global_batch * grad_accum))
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_DATA, epoch))
            self._epoch, self._perm = epoch, torch.randperm(len(self.cache), generator=gen)
        return self._perm

    def indices(self, epoch: int, iteration: int, micro: int = 0) -> torch.Tensor:
        """Cache rows (B,) of this rank's micro-batch ``micro`` of step ``iteration``."""
        start = ((iteration * self.grad_accum + micro) * self.num_processes + self.rank) * self.batch_size
        positions = (start + torch.arange(self.batch_size)) % len(self.cache)
        return self.permutation(epoch)[positions]

    def batch(self, epoch: int, iteration: int, micro: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cache.gather(self.indices(epoch, iteration, micro))
