"""The 2-D toy flow: the same σ_min path and loss (``flow.cfm_loss``) and the same ODE
solvers (``solvers.integrate``) as the image model, on points of the plane, where the whole
flow can be watched (``python main.py toy``).

A small MLP learns the velocity field in seconds on a CPU. The figures: ``flow.gif``
(particles carried from noise at t = 0 to data at t = 1), ``field.png`` (the learned velocity
at a few times) and ``samples.png`` (samples beside the data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .errors import LatentflowError
from .flow import cfm_loss, meanflow_loss, sample_time, sample_two_times

__all__ = ["TOY_DATA", "VelocityMLP", "draw_field", "draw_flow_gif", "draw_samples", "sample_toy", "train_toy"]


# --- data -------------------------------------------------------------------------------------


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles, with a little noise."""
    a = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return pts + 0.06 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform points on the dark squares of a 4 x 4 board on [-2, 2]^2."""
    x = torch.rand(n, generator=g) * 4 - 2
    row = torch.randint(0, 2, (n,), generator=g) * 2 + torch.rand(n, generator=g)  # within alternate rows
    col_parity = torch.floor(x + 2).long() % 2
    y = row - 2 + col_parity  # shift every other column by one row
    return torch.stack([x, y], 1)


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """Eight Gaussians on a circle of radius 2."""
    k = torch.randint(0, 8, (n,), generator=g).float()
    centres = 2 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    return centres + 0.15 * torch.randn(n, 2, generator=g)


TOY_DATA = {"moons": _moons, "checkerboard": _checkerboard, "8gaussians": _eight_gaussians}


def sample_toy(name: str, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if name not in TOY_DATA:
        raise LatentflowError(f"toy data {name!r}: choose one of {', '.join(TOY_DATA)}")
    return TOY_DATA[name](n, generator or torch.Generator().manual_seed(0))


# --- model ------------------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """v(x, t) on R^2: sinusoidal features of t beside x, three hidden layers. With
    ``two_times``, u(x, r, t) as ``forward(x, r, gap=t - r)``: the gap's features too."""

    def __init__(self, hidden: int = 128, time_features: int = 16, two_times: bool = False):
        super().__init__()
        self.two_times = two_times
        # An average-velocity model is differentiated in time, which multiplies by these
        # frequencies: it takes eight times lower ones (at most π), or its one-jump map is lost
        # (measured on the 8 Gaussians: FD 1.10 with π·k, 0.005 with π·k/8, after 400 steps).
        base = math.pi / 8 if two_times else math.pi
        self.freqs = nn.Parameter(torch.arange(1, time_features // 2 + 1).float() * base, requires_grad=False)
        self.net = nn.Sequential(
            nn.Linear(2 + time_features * (2 if two_times else 1), hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, gap: Optional[torch.Tensor] = None) -> torch.Tensor:
        times = [t] + ([torch.zeros_like(t) if gap is None else gap] if self.two_times else [])
        features = []
        for time in times:
            angles = time[:, None] * self.freqs[None]  # (B, F/2)
            features += [torch.sin(angles), torch.cos(angles)]
        return self.net(torch.cat([x, *features], 1))  # (B, 2)


def train_toy(
    data: str = "moons",
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 2e-3,
    sigma_min: float = 1e-3,
    seed: int = 0,
    objective: str = "cfm",
) -> VelocityMLP:
    """Fit the velocity field of ``data`` with the conditional flow-matching loss, or (with
    ``objective="meanflow"``) its average velocity with the MeanFlow loss, on one thread: a
    model this small only loses time to thread synchronisation."""
    if objective not in ("cfm", "meanflow"):
        raise LatentflowError(f"toy objective {objective!r}: choose cfm or meanflow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(data, steps, batch_size, lr, sigma_min, seed, objective)
    finally:
        torch.set_num_threads(threads)


def _fit(data: str, steps: int, batch_size: int, lr: float, sigma_min: float, seed: int, objective: str):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VelocityMLP(two_times=objective == "meanflow")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x1 = sample_toy(data, batch_size, g)  # data end
        x0 = torch.randn(batch_size, 2, generator=g)  # noise end
        if objective == "meanflow":
            r, t = sample_two_times(batch_size, 0.75, generator=g, scheme="uniform")
            average = lambda z, r_, t_: model(z, r_, gap=t_ - r_)
            loss = meanflow_loss(average, x0, x1, r, t, sigma_min)[0].mean()
        else:
            t = sample_time(batch_size, "uniform", generator=g)
            loss = cfm_loss(model, x0, x1, t, sigma_min).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


# --- figures ----------------------------------------------------------------------------------


def _limits(data):
    data = np.asarray(data)
    lo, hi = data.min(0) - 0.5, data.max(0) + 0.5
    return [min(lo[0], -3), max(hi[0], 3)], [min(lo[1], -3), max(hi[1], 3)]


def _plane(ax, xlim, ylim, title: str) -> None:
    """A bare panel of the plane: fixed limits, no ticks, a small title."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def draw_flow_gif(frames, times, data, path: Path, size: int = 3) -> None:
    """Particles at each time (t = 0 noise to t = 1 data) as an animated GIF."""
    from PIL import Image

    from .figures import new_figure

    xlim, ylim = _limits(data)
    images = []
    for x, t in zip(frames, times):
        fig, ax = new_figure(figsize=(size, size), dpi=80)
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", alpha=0.6, linewidths=0)
        _plane(ax, xlim, ylim, f"t = {t:.2f}")
        fig.tight_layout()
        fig.canvas.draw()
        images.append(
            Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).convert("P", palette=Image.ADAPTIVE)
        )
    durations = [60] * (len(images) - 1) + [1200]  # linger on the data
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def draw_field(model, data, path: Path, times=(0.0, 0.33, 0.67, 1.0)) -> None:
    """The learned velocity field at a few times, over the data."""
    from .figures import new_figure

    xlim, ylim = _limits(data)
    gx, gy = np.meshgrid(np.linspace(*xlim, 21), np.linspace(*ylim, 21))
    pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    fig, axes = new_figure(1, len(times), figsize=(3 * len(times), 3), dpi=100)
    for ax, t in zip(axes, times):
        with torch.no_grad():
            v = model(pts, torch.full((len(pts),), t)).numpy()
        speed = np.linalg.norm(v, axis=1)
        ax.scatter(data[:1500, 0], data[:1500, 1], s=1, c="0.8", linewidths=0)
        ax.quiver(gx.ravel(), gy.ravel(), v[:, 0], v[:, 1], speed, cmap="viridis", scale=None)
        _plane(ax, xlim, ylim, f"v(x, t = {t:.2f})")
    fig.tight_layout()
    fig.savefig(path, format="png")


def draw_samples(samples, data, path: Path, title: str) -> None:
    """Samples beside the data."""
    from .figures import new_figure

    xlim, ylim = _limits(data)
    fig, axes = new_figure(1, 2, figsize=(6, 3), dpi=100)
    for ax, pts, name in ((axes[0], data, "data"), (axes[1], samples, title)):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, linewidths=0)
        _plane(ax, xlim, ylim, name)
    fig.tight_layout()
    fig.savefig(path, format="png")
