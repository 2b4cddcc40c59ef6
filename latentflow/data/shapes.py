"""A folder of coloured shapes, drawn here: a labelled colour dataset that needs no download,
for trying the colour path end to end offline (``experiments/colour_folder.py``) and for the
tests.

``write_shapes_folder(root)`` writes ``root/circle``, ``root/square`` and ``root/triangle``,
PNG images of one filled shape each: a random saturated colour, size, position and (for
squares and triangles) rotation, on a random pale background. The class is in the outline,
not the colour, so a model has to learn both.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["SHAPES", "write_shapes_folder"]

SHAPES = ("circle", "square", "triangle")


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float):
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def draw_shape(shape: str, size: int, rng: np.random.Generator):
    """One RGB image (a PIL image of ``size`` px) of ``shape``."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn large, then reduced: smooth edges
    big = size * scale
    hue, sat, val = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 0.95)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val))
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.22, 0.36)
    cx, cy = (big * rng.uniform(0.38, 0.62) for _ in range(2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        sides = 4 if shape == "square" else 3
        draw.polygon(
            _polygon(cx, cy, r * (1.15 if sides == 3 else 1.0), sides, rng.uniform(0, 2 * math.pi)), fill=colour
        )
    return img.resize((size, size), Image.LANCZOS)


def write_shapes_folder(
    root: Path, per_class: int = 100, size: int = 32, seed: int = 0, shapes: Sequence[str] = SHAPES
) -> Path:
    """Write ``per_class`` images of each shape into ``root/<shape>/NNNN.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape in shapes:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, size, rng).save(root / shape / f"{i:04d}.png")
    return root
