"""The latent cache: a dataset encoded once by the frozen VAE.

For every image the cache keeps the posterior mean and standard deviation (VAE space),
the label and the image's index in the dataset. Training draws a fresh latent from the
posterior at every step, ``z = mean + std * eps`` (what ``latent_dist.sample()`` does),
instead of freezing one sample. Entries are keyed by dataset index, so shuffling cannot
pair a latent with another image's label.

The file is ``<cache_dir>/latents-<key>.safetensors``, where ``key`` hashes the metadata
(VAE identity, scale/shift, image size, dataset fingerprint, format version); the same
metadata is stored inside the file and checked on load. A file whose metadata differs or
that cannot be read is rebuilt, with a message saying why. Only the main process encodes
and writes (atomically); the others wait and then read.
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
from .vae import FrozenVAE

__all__ = ["LatentCache", "cache_metadata", "default_cache_dir", "encode_dataset", "load_or_build_cache"]

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
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    means, stds, labels, indices = [], [], [], []
    for images, y, idx in progress(loader) if progress else loader:
        mean, std = vae.encode(images)  # (B, c, h, w) each
        means.append(mean.cpu())
        stds.append(std.cpu())
        labels.append(y)
        indices.append(idx)
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(labels), torch.cat(indices))


def _read(path: Path, metadata: Dict[str, str]) -> Tuple[Optional[LatentCache], str]:
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
        return LatentCache(t["mean"], t["std"], t["labels"], t["indices"]), ""
    except (SafetensorError, OSError, KeyError) as exc:
        return None, f"it cannot be read ({exc})"


def load_or_build_cache(
    vae: FrozenVAE,
    dataset: ImageDataset,
    cache_dir: Path,
    accelerator,
    batch_size: int = 256,
    progress: Optional[Callable] = None,
) -> Tuple[LatentCache, Path]:
    """Reuse the cache whose metadata matches, or encode the dataset (main process) and save it."""
    metadata = cache_metadata(vae, dataset)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if accelerator.is_main_process:
        cache, why = _read(path, metadata)
        if cache is None:
            accelerator.print(
                f"latent cache {path} is stale: {why}; rebuilding" if why else f"encoding {len(dataset)} images into {path}"
            )
            cache = encode_dataset(vae, dataset, batch_size, progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tensors = {"mean": cache.mean, "std": cache.std, "labels": cache.labels, "indices": cache.indices}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)  # atomic: readers never see a half-written cache
        else:
            accelerator.print(f"using latent cache {path}")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache, why = _read(path, metadata)
        if cache is None:
            raise RuntimeError(f"latent cache {path} written by the main process is unusable: {why}")
    return cache, path
