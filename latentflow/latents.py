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
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .runtime import STREAM_DATA, STREAM_FLIP, atomic_file, derive_seed, on_main
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
    """Posterior moments (N, c, h, w), labels (N,) and dataset indices (N,); with ``hflip``
    also the moments of each image's mirror. Rows of bad files skipped while encoding are
    absent, so ``indices`` says which dataset item each row is."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 mean_flip: Optional[torch.Tensor] = None, std_flip: Optional[torch.Tensor] = None):
        self.mean, self.std, self.labels, self.indices = mean, std, labels.long(), indices.long()
        self.mean_flip, self.std_flip = mean_flip, std_flip
        self.bad_files: List[Tuple[str, str]] = []  # (path, reason) skipped while encoding

    @property
    def has_flips(self) -> bool:
        return self.mean_flip is not None

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mean[i], self.std[i], self.labels[i], self.indices[i]

    def gather(self, idx: torch.Tensor, flip: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        """Moments (B, c, h, w) x 2 and labels (B,) of cache rows ``idx`` (B,), in one gather;
        where ``flip`` (B,) is true, the mirrored image's moments."""
        mean, std = self.mean[idx], self.std[idx]
        if flip is not None and flip.any():
            f = flip.view(-1, 1, 1, 1)
            mean = torch.where(f, self.mean_flip[idx], mean)
            std = torch.where(f, self.std_flip[idx], std)
        return mean, std, self.labels[idx]

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {"mean": self.mean, "std": self.std, "labels": self.labels, "indices": self.indices}
        if self.has_flips:
            out.update(mean_flip=self.mean_flip, std_flip=self.std_flip)
        return out

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(self.mean.shape[1:])


def cache_metadata(vae: FrozenVAE, dataset, hflip: bool = False) -> Dict[str, str]:
    """What a cache was made from: two caches with equal metadata hold the same latents."""
    return {
        "format": CACHE_FORMAT,
        "vae": vae.identity,
        "scale": json.dumps(vae.scale(torch.zeros(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "unit": json.dumps(vae.scale(torch.ones(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "image_shape": json.dumps(list(dataset.image_shape)),
        "dataset": dataset.fingerprint(),
        "num_items": str(len(dataset)),
        "hflip": str(bool(hflip)),
    }


def _bad_file_error(path: str, reason: str) -> DataError:
    return DataError(f"{path}: {reason}; fix or remove it, or set data.skip_bad_images=true to skip bad files")


@torch.no_grad()
def encode_dataset(
    vae: FrozenVAE,
    dataset,
    batch_size: int = 256,
    progress: Optional[Callable] = None,
    hflip: bool = False,
    skip_bad: bool = False,
    workers: int = 0,
) -> LatentCache:
    """Encode every image in dataset order (no shuffling, no random augmentation); with
    ``hflip`` its mirror too. A dataset that reports bad files (a folder) either stops at the
    first (one-line ``DataError``) or, with ``skip_bad``, leaves them out and lists them."""
    # An explicit generator: iterating a DataLoader otherwise draws from the global one, and
    # a run would then depend on whether its cache already existed.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                        num_workers=workers, persistent_workers=False)
    parts: Dict[str, list] = {k: [] for k in ("mean", "std", "labels", "indices", "mean_flip", "std_flip")}
    bad: List[Tuple[str, str]] = []
    for batch in progress(loader) if progress else loader:
        images, y, idx = batch[:3]
        reasons = batch[3] if len(batch) > 3 else [""] * len(idx)
        good = torch.tensor([not r for r in reasons], dtype=torch.bool)
        for i, reason in zip(idx.tolist(), reasons):
            if reason:
                if not skip_bad:
                    raise _bad_file_error(str(dataset.files[i]), reason)
                bad.append((str(dataset.files[i]), reason))
        if not good.all():
            images, y, idx = images[good], y[good], idx[good]
        if len(idx) == 0:
            continue
        mean, std = vae.encode(images)  # (B, c, h, w) each
        parts["mean"].append(mean.cpu())
        parts["std"].append(std.cpu())
        parts["labels"].append(y)
        parts["indices"].append(idx)
        if hflip:
            mean_f, std_f = vae.encode(images.flip(-1))  # the mirror image, encoded as itself
            parts["mean_flip"].append(mean_f.cpu())
            parts["std_flip"].append(std_f.cpu())
    if not parts["mean"]:
        raise DataError(f"none of the {len(dataset)} files of {dataset.origin} could be used "
                        f"(first: {bad[0][0]}: {bad[0][1]})")
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    cache = LatentCache(cat["mean"], cat["std"], cat["labels"], cat["indices"], cat["mean_flip"], cat["std_flip"])
    cache.bad_files = bad
    return cache


def _check(cache: LatentCache, dataset) -> str:
    """Why a cache that read fine cannot be trusted, or ""."""
    tensors = cache.tensors()
    if not all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point()):
        return "it holds non-finite moments"
    if dataset is not None:
        idx = cache.indices
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(dataset) or not bool((idx[1:] > idx[:-1]).all()):
            return "its rows do not match the dataset"
        if not torch.equal(cache.labels, dataset.labels[idx]):
            return "its labels differ from the dataset's"
    return ""


def _read(path: Path, metadata: Dict[str, str], dataset=None) -> Tuple[Optional[LatentCache], str]:
    """-> (cache, "") if the file is usable, else (None, why not)."""
    if not path.exists():
        return None, ""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
        bad = json.loads(stored.pop("bad_files", "[]"))
        if stored != metadata:
            diff = sorted(k for k in set(stored) | set(metadata) if stored.get(k) != metadata.get(k))
            return None, f"it was made with different {', '.join(diff)}"
        t = load_file(str(path))
        cache = LatentCache(t["mean"], t["std"], t["labels"], t["indices"], t.get("mean_flip"), t.get("std_flip"))
        cache.bad_files = [tuple(b) for b in bad]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        return None, f"it cannot be read ({exc})"
    why = _check(cache, dataset)
    return (None, why) if why else (cache, "")


def _report_bad(cache: LatentCache, dataset, cfg, say: Callable) -> None:
    """Apply the bad-file policy to a cache built (or read) with some files skipped."""
    if not cache.bad_files:
        return
    if cfg is None or not cfg.skip_bad_images:
        raise _bad_file_error(*cache.bad_files[0])
    fraction = len(cache.bad_files) / len(dataset)
    first = "; ".join(f"{p}: {r}" for p, r in cache.bad_files[:3])
    if fraction > cfg.max_bad_fraction:
        raise DataError(
            f"{len(cache.bad_files)} of {len(dataset)} files of {dataset.origin} are bad ({fraction:.1%}, more than "
            f"data.max_bad_fraction={cfg.max_bad_fraction:g}); first: {first}"
        )
    say(f"skipped {len(cache.bad_files)} bad file(s) of {len(dataset)} ({fraction:.2%}): {first}"
        + (" ..." if len(cache.bad_files) > 3 else ""))


def load_or_build_cache(
    vae: FrozenVAE,
    dataset,
    cache_dir: Path,
    accelerator,
    batch_size: int = 256,
    progress: Optional[Callable] = None,
    data_cfg=None,
) -> Tuple[LatentCache, Path]:
    """Reuse the cache whose metadata matches, or encode the dataset (main process) and save it.
    A failure on the main process (a bad image file, a VAE that encodes to NaN, a full or
    read-only cache directory) fails every rank with the same one-line error. ``data_cfg``
    (the experiment's data section) brings hflip, the bad-file policy and decode workers."""
    hflip = bool(data_cfg and data_cfg.hflip)
    metadata = cache_metadata(vae, dataset, hflip)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.safetensors"

    def build() -> None:
        if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise DataError(f"cache directory {cache_dir} is a file; pass --cache-dir DIR (a directory)")
        cache, why = _read(path, metadata, dataset)
        if cache is not None:
            accelerator.print(f"using latent cache {path}")
            _report_bad(cache, dataset, data_cfg, accelerator.print)
            return
        accelerator.print(
            f"latent cache {path} is stale: {why}; rebuilding" if why else f"encoding {len(dataset)} images into {path}"
        )
        workers = min(data_cfg.decode_workers, os.cpu_count() or 1) if data_cfg is not None and hasattr(dataset, "files") else 0
        cache = encode_dataset(vae, dataset, batch_size, progress, hflip,
                               skip_bad=bool(data_cfg and data_cfg.skip_bad_images), workers=workers)
        _report_bad(cache, dataset, data_cfg, accelerator.print)
        if _check(cache, None):
            bad = (~torch.isfinite(cache.mean.flatten(1)).all(1) | ~torch.isfinite(cache.std.flatten(1)).all(1)).nonzero()
            raise DataError(
                f"VAE {vae.name} encodes {len(bad)} of {len(dataset)} images to non-finite latents "
                f"(first: item {int(cache.indices[bad[0]])} of {dataset.origin}); check the VAE's weights and the images"
            )
        tensors = cache.tensors()
        needed = sum(t.nbytes for t in tensors.values())
        with atomic_file(path, "latent cache", needed, intact="no cache was written") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={**metadata, "bad_files": json.dumps(cache.bad_files)})

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
        """This rank's moments and labels; with mirrored moments cached, each sample's
        orientation is drawn from the (seed, rank, epoch, iteration, micro) stream."""
        idx = self.indices(epoch, iteration, micro)
        flip = None
        if self.cache.has_flips:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_FLIP, self.rank, epoch, iteration, micro))
            flip = torch.rand(len(idx), generator=gen) < 0.5
        return self.cache.gather(idx, flip)
