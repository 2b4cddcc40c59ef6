"""npz arrays: ``images`` (uint8, [N, H, W] or [N, H, W, C]) and optional integer ``labels``."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np

from ..bounded import physical_memory
from ..errors import DataError

__all__ = ["load_npz"]


_WRITE = "write it with numpy.savez(path, images=uint8 array, labels=integer array)"
MAX_RATIO = 200  # inflation of one array beyond which a large member is a decompression bomb
RATIO_FROM = 256 << 20  # members above this size are held to MAX_RATIO


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _check_inflation(path: Path) -> None:
    """Read what the archive's directory says its arrays inflate to, before inflating any:
    more than half this machine's memory, or a large array packed beyond ``MAX_RATIO``:1
    (real pixels compress a few times; a 2 MB file of zeros that unpacks to 2 GB is a bomb),
    is a one-line error."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    total = sum(m.file_size for m in members)
    memory = physical_memory()
    if memory and total > memory // 2:
        raise DataError(
            f"{path}: its arrays unpack to {_size(total)}, more than half of this machine's "
            f"{_size(memory)}; split the data, or use an image folder (data.source=folder)"
        )
    for m in members:
        if m.file_size > RATIO_FROM and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            raise DataError(
                f"{path}: {m.filename} unpacks from {_size(m.compress_size)} to {_size(m.file_size)} "
                f"({m.file_size // max(m.compress_size, 1)}:1), a decompression bomb rather than images; "
                f"{_WRITE} from real pixels"
            )


def load_npz(path: Path) -> Tuple[np.ndarray, np.ndarray, int]:
    """-> images uint8, labels int64 (zeros if absent), num_classes (0 if unlabelled)."""
    if path.is_dir():
        raise DataError(f"data.path {path} is a directory; give the .npz file (or set data.source=folder)")
    if not path.is_file():
        raise DataError(f"npz file {path} not found; check data.path")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (not a zip archive); {_WRITE}")
    _check_inflation(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(
                f"{path}: holds Python objects (pickled) that are not loaded for safety; {_WRITE}"
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({exc}); {_WRITE}") from None
    except Exception as exc:  # zipfile and value errors all mean "not a usable npz"
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); {_WRITE}") from None
    if "images" not in arrays:
        raise DataError(f"{path}: no array named 'images' (found: {', '.join(arrays) or 'none'}); {_WRITE}")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' has dtype {images.dtype}; save uint8 pixels in [0, 255]")
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"{path}: 'images' has shape {images.shape}; expected non-empty [N, H, W] or [N, H, W, C]")
    if "labels" not in arrays:
        return images, np.zeros(len(images), dtype=np.int64), 0
    labels = arrays["labels"]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{path}: 'labels' has shape {labels.shape} for {len(images)} images; expected ({len(images)},)"
        )
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
