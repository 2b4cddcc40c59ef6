"""``python main.py toy``: the 2-D toy flow, trained in seconds, with a GIF of the flow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..files import atomic_file
from ..metrics import frechet_distance
from ..solvers import integrate
from ..toy import draw_field, draw_flow_gif, draw_samples, sample_toy, train_toy
from . import new_output_dir, say

__all__ = ["main", "toy"]


def toy(
    data: str = "moons",
    out: Optional[Path] = None,
    steps: int = 3000,
    particles: int = 2000,
    frames: int = 40,
    solver: str = "heun",
    ode_steps: int = 40,
    seed: int = 0,
    objective: str = "cfm",
) -> Dict:
    """Train on 2-D ``data`` and write ``flow.gif``, ``field.png`` and ``samples.png`` into
    ``out`` (default ``runs/toy-<data>-<timestamp>/``). With ``objective="meanflow"`` the
    model learns average velocities; the flow is then its instantaneous velocity u(x, t, t)
    integrated as before, and ``one_step.png`` shows the same noise carried in one jump."""
    sample_toy(data, 1)  # refuses an unknown name before any work
    out = new_output_dir(f"toy-{data}" + ("-meanflow" if objective == "meanflow" else ""), out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = train_toy(data, steps, seed=seed, objective=objective)
    seconds = time.perf_counter() - start
    real = sample_toy(data, particles, torch.Generator().manual_seed(seed + 1))
    x0 = torch.randn(particles, 2, generator=torch.Generator().manual_seed(seed + 2))
    result = integrate(model, x0, solver, ode_steps, keep_trajectory=True)
    pick = np.unique(np.linspace(0, len(result.trajectory) - 1, frames).round().astype(int))
    trajectory = [result.trajectory[i].numpy() for i in pick]
    times = [result.times[i] for i in pick]
    title = f"samples ({solver} {ode_steps}, NFE {result.nfe})"
    figures = [
        ("flow.gif", lambda p: draw_flow_gif(trajectory, times, real, p)),
        ("field.png", lambda p: draw_field(model, real.numpy(), p)),
        ("samples.png", lambda p: draw_samples(result.x.numpy(), real.numpy(), p, title)),
    ]
    jump_text = ""
    if objective == "meanflow":
        with torch.no_grad():
            jump = integrate(lambda x, r, t: model(x, r, gap=t - r), x0, "meanflow", 1).x.numpy()
        jump_fd = frechet_distance(jump, real.numpy())
        figures.append(("one_step.png", lambda p: draw_samples(jump, real.numpy(), p, "one jump (NFE 1)")))
        jump_text = f"; one jump (NFE 1): FD {jump_fd:.4f}"
    written = {}
    for name, draw in figures:
        with atomic_file(out / name, "figure") as tmp:
            draw(tmp)
        written[name] = out / name
    fd = frechet_distance(result.x.numpy(), real.numpy())
    return {
        "out": out,
        "written": written,
        "train_seconds": seconds,
        "nfe": result.nfe,
        "fd": fd,
        "summary": f"toy {data}: {steps} steps in {seconds:.1f} s; {particles} samples, {solver} {ode_steps} "
        f"(NFE {result.nfe}), FD to fresh data {fd:.4f}{jump_text} -> {out}",
    }


def main(args) -> None:
    say(
        toy(
            args.data,
            args.out,
            steps=args.steps,
            particles=args.particles,
            frames=args.frames,
            solver=args.solver,
            ode_steps=args.ode_steps,
            seed=args.seed,
            objective=args.objective,
        )["summary"]
    )
