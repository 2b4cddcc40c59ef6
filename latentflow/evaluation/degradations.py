"""Known degradations of real images, at increasing strengths: how a feature space is checked
before it is trusted. A metric that sees what it measures must grow with each of them.

Each function takes uint8 images (N, H, W, C) and a strength and returns degraded uint8
images of the same shape; ``DEGRADATIONS`` lists them with the strengths the tests and
``experiments/metric_sensitivity.py`` use. Set-level faults (dropped classes, duplicates)
change which images a set holds, not the images: they are what precision and recall tell
apart."""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEGRADATIONS", "blur", "drop_classes", "duplicate", "noise", "shift", "thicken", "thin"]


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, C, H, W) in [0, 255]


def _uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def blur(images: np.ndarray, sigma: float, rng=None) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels."""
    x = _float(images)
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return _uint8(x)


def noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` (a fraction of the full range)."""
    x = images.astype(np.float32) + rng.normal(0.0, 255.0 * sigma, images.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def thicken(images: np.ndarray, pixels: float, rng=None) -> np.ndarray:
    """Strokes made thicker by ``pixels`` 3x3 grey-level dilations (each widens a stroke by
    about a pixel on either side)."""
    x = _float(images)
    for _ in range(int(pixels)):
        x = F.max_pool2d(x, 3, 1, 1)
    return _uint8(x)


def thin(images: np.ndarray, amount: float, rng=None) -> np.ndarray:
    """Strokes made thinner: a blend, by ``amount`` in [0, 1], with one 3x3 grey-level erosion
    (a whole erosion already removes MNIST's thinnest strokes, so the steps are fractions)."""
    x = _float(images)
    return _uint8((1 - amount) * x + amount * -F.max_pool2d(-x, 3, 1, 1))


def _move(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images moved down ``dy`` and right ``dx`` pixels (negative: up, left); zeros fill in."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]

    def spans(d, n):  # (source, destination) slices along one axis
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (ys, yd), (xs, xd) = spans(dy, h), spans(dx, w)
    out[:, yd, xd] = images[:, ys, xs]
    return out


def shift(images: np.ndarray, pixels: float, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by ``pixels`` in one of the 8 directions, drawn at random."""
    p = int(pixels)
    directions = [(-p, -p), (-p, 0), (-p, p), (0, -p), (0, p), (p, -p), (p, 0), (p, p)]
    moves = rng.integers(0, len(directions), len(images))
    out = np.empty_like(images)
    for k, (dy, dx) in enumerate(directions):
        sel = moves == k
        out[sel] = _move(images[sel], dy, dx)
    return out


def drop_classes(
    images: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """The set with classes 0..k-1 left out, refilled to its size from the other classes."""
    keep = np.flatnonzero(labels >= k)
    pick = rng.choice(keep, size=len(images), replace=len(keep) < len(images))
    return images[pick], labels[pick]


def duplicate(
    images: np.ndarray, labels: np.ndarray, copies: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """The set made of len / ``copies`` distinct images, each ``copies`` times."""
    unique = rng.permutation(len(images))[: max(1, len(images) // copies)]
    pick = np.resize(np.repeat(unique, copies), len(images))
    return images[pick], labels[pick]


# name -> (function, strengths), image-level faults only
DEGRADATIONS: Dict[str, Tuple[Callable, Tuple[float, ...]]] = {
    "blur": (blur, (0.5, 1.0, 1.5)),
    "noise": (noise, (0.05, 0.1, 0.2)),
    "thin": (thin, (0.25, 0.5, 1.0)),
    "thicken": (thicken, (1, 2, 3)),
    "shift": (shift, (2, 3, 4)),
}
