"""Figures: image grids, reconstruction strips, loss curves. Images are uint8 (N, H, W, C)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from einops import rearrange
from PIL import Image

__all__ = [
    "class_grid_labels",
    "image_grid",
    "new_figure",
    "save_grid",
    "save_loss_by_time",
    "save_loss_curve",
    "save_reconstruction_figure",
    "save_eval_curve",
    "save_trajectory",
]


def image_grid(images: np.ndarray, ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into rows of ``ncol`` with a ``pad``-pixel border."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    blank = np.full((nrow * ncol - n, h, w, c), fill, dtype=np.uint8)
    tiles = np.concatenate([images, blank])
    tiles = np.pad(tiles, ((0, 0), (pad, 0), (pad, 0), (0, 0)), constant_values=fill)
    grid = rearrange(tiles, "(r k) h w c -> (r h) (k w) c", r=nrow, k=ncol)
    return np.pad(grid, ((0, pad), (0, pad), (0, 0)), constant_values=fill)


def save_grid(images: np.ndarray, path: Path, ncol: int, scale: int = 2, format: Optional[str] = None) -> Path:
    """Write a grid image; ``format`` when the path has no telling suffix (a temporary)."""
    path = Path(path)
    grid = image_grid(images, ncol)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=format)
    return path


def save_reconstruction_figure(originals: np.ndarray, reconstructions: np.ndarray, path: Path, scale: int = 2) -> Path:
    """Three rows: originals, reconstructions, |difference| (amplified x4 to be visible)."""
    diff = np.abs(originals.astype(np.int16) - reconstructions.astype(np.int16))
    diff = np.clip(diff * 4, 0, 255).astype(np.uint8)
    strip = np.concatenate([originals, reconstructions, diff])
    return save_grid(strip, path, ncol=len(originals), scale=scale)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` drawn by Agg without pyplot: no global backend is switched and no
    figure stays open, so callers (a notebook's inline backend included) are left as they were.
    ``kwargs`` go to ``Figure`` (figsize, dpi) and ``Figure.subplots`` (squeeze)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    squeeze = kwargs.pop("squeeze", True)
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_loss_curve(log_file: Path, path: Path, title: Optional[str] = None) -> Path:
    """Training loss (per log interval) and per-epoch mean, from a run's log.jsonl."""
    steps, losses, epoch_steps, epoch_losses, val = [], [], [], [], []
    for line in Path(log_file).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            steps.append(rec["step"])
            losses.append(rec["loss"])
        elif rec.get("event") == "epoch" and rec.get("loss") is not None:
            epoch_steps.append(rec["step"])
            epoch_losses.append(rec["loss"])
            if rec.get("val_loss") is not None:
                val.append((rec["step"], rec["val_loss"]))
    fig, ax = new_figure(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.8, alpha=0.6, label="loss (log interval)")
    ax.plot(epoch_steps, epoch_losses, "o-", ms=3, label="epoch mean")
    if val:
        ax.plot(*zip(*val), "s-", ms=3, label="validation (EMA, fixed t and noise)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CFM loss")
    return _finish(fig, ax, path, title)


def _finish(fig, ax, path: Path, title: Optional[str], legend_size: Optional[int] = None) -> Path:
    """Log-scale y, grid, legend and title, then save and close."""
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_loss_by_time(log_file: Path, path: Path, title: Optional[str] = None, max_curves: int = 6) -> Path:
    """Training loss per equal-width t bin (t = 0 noise, 1 data), for a few epochs."""
    epochs = [json.loads(line) for line in Path(log_file).read_text().splitlines()]
    epochs = [e for e in epochs if e.get("event") == "epoch" and e.get("loss_by_time")]
    if not epochs:
        return path
    pick = sorted({round(i * (len(epochs) - 1) / max(1, max_curves - 1)) for i in range(max_curves)})
    fig, ax = new_figure(figsize=(6, 3.5), dpi=120)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for k, i in enumerate(pick):
        bins = epochs[i]["loss_by_time"]
        centers = [(j + 0.5) / len(bins) for j in range(len(bins))]
        ax.plot(centers, bins, "o-", ms=3, color=cmap(k / max(1, len(pick) - 1)), label=f"epoch {epochs[i]['epoch']}")
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.set_ylabel("CFM loss in bin")
    return _finish(fig, ax, path, title, legend_size=7)


def class_grid_labels(num_classes: int, per_class: int) -> Sequence[int]:
    """Labels for a grid with one row per class: 0 0 0 ... 1 1 1 ... (or all-null rows)."""
    if num_classes == 0:
        return None
    return [c for c in range(num_classes) for _ in range(per_class)]


def save_trajectory(
    frames: Sequence[np.ndarray], times: Sequence[float], path: Path, max_rows: int = 8, title: Optional[str] = None
) -> Path:
    """Decoded x_t along the ODE path: one row per sample, one column per time (t = 0 noise
    on the left, t = 1 data on the right). ``frames``: uint8 (N, H, W, C) per time."""
    rows, cols = min(max_rows, len(frames[0])), len(frames)
    fig, axes = new_figure(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), dpi=100, squeeze=False)
    for j, (frame, t) in enumerate(zip(frames, times)):
        for i in range(rows):
            ax = axes[i, j]
            img = frame[i]
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None,
                vmin=0,
                vmax=255,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t = {t:.2f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def save_eval_curve(log_file: Path, path: Path, title: Optional[str] = None) -> Path:
    """FD (with its bootstrap spread and the floor) and class accuracy over training, from the
    'eval' records of a run's log.jsonl."""
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if '"eval"' in line]
    records = [r for r in records if r.get("event") == "eval"]
    if not records:
        return path
    fig, axes = new_figure(1, 2, figsize=(9, 3.4), dpi=120)
    epochs = [r["epoch"] for r in records]
    for name in records[-1]["references"]:
        fd = [r["references"][name]["fd"] for r in records]
        sd = [r["references"][name]["fd_std"] for r in records]
        axes[0].errorbar(epochs, fd, yerr=sd, marker="o", ms=3, capsize=2, label=f"FD to {name}")
        floor = records[-1]["references"][name].get("floor")
        if floor:
            axes[0].axhline(
                floor["fd"],
                ls="--",
                lw=1,
                color=axes[0].lines[-1].get_color(),
                label=f"floor ({name}, {floor['n']} real)",
            )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FD")
    if "accuracy" in records[-1]:
        axes[1].plot(epochs, [100 * r["accuracy"] for r in records], "o-", ms=3)
    axes[1].set_ylabel("class accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
