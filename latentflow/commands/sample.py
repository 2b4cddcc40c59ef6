"""``python main.py sample``: draw from an export, a run or a checkpoint and write a grid
(``OUT.png``) and the arrays (``OUT.npz``: ``images`` uint8 [N, H, W, C], ``labels``, -1 for
unconditional), by default under ``RUN/samples/``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..errors import LatentflowError
from ..files import atomic_file, check_output
from ..pipeline import load_pipeline
from ..sampling import SamplerSettings
from . import default_output, device_for, say

__all__ = ["FLAG_NAMES", "generate", "main"]

# What the command line calls each setting, for errors.
FLAG_NAMES = {
    "num_images": "--num-samples",
    "feature_net": "--feature-net",
    "labels": "--labels",
    "solver": "--solver",
    "steps": "--steps",
    "cfg_scale": "--cfg-scale",
    "guidance_interval": "--guidance-interval",
    "atol": "atol",
    "rtol": "rtol",
}


def generate(
    source: Path,
    out: Optional[Path] = None,
    *,
    labels: Optional[str] = None,
    num_samples: int = 100,
    seed: int = 0,
    solver: Optional[str] = None,
    steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    batch_size: int = 500,
    ncol: Optional[int] = None,
    overwrite: bool = False,
    device=None,
    trajectory: int = 0,
    names: Optional[Dict[str, str]] = None,
) -> dict:
    """Draw ``num_samples`` images from any model source and write ``OUT.png`` and
    ``OUT.npz``; with ``trajectory`` also ``OUT_trajectory.png``, x_t decoded at that many
    times, one row per sample. ``labels``: as the pipeline reads them (default: every class
    in turn). Returns what was done. ``names``: what the caller calls each setting, for errors."""
    names = names or {"labels": "labels"}
    pipe = load_pipeline(source, device)
    labels = "all" if labels is None else labels
    chosen, settings = pipe.resolve(labels, num_samples, names, solver=solver, steps=steps, cfg_scale=cfg_scale)
    if out is None:  # named by the scale asked for, even where a draw without labels uses 0
        named = SamplerSettings.resolve(
            pipe.sampler_settings, names=names, solver=solver, steps=steps, cfg_scale=cfg_scale
        )
        out = default_output(source, "samples", f"{named.tag}-n{num_samples}-seed{seed}.png")
    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise LatentflowError(f"--out {out}: give a .png (grid) or .npz (arrays) path; both are written")
    png, npz = out.with_suffix(".png"), out.with_suffix(".npz")
    check_output([png, npz], overwrite)
    start = time.perf_counter()
    result = pipe.draw(
        chosen,
        num_samples,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        trajectory_times=trajectory,
        names=names,
        **settings.choices,
    )
    seconds = time.perf_counter() - start
    written = _write(result, png, npz, ncol or min(10, num_samples), trajectory, num_samples)
    s = result.settings
    return {
        "png": png,
        "npz": npz,
        "written": written,
        "solver": s.solver,
        "steps": s.steps,
        "nfe": result.nfe,
        "cfg_scale": s.cfg_scale,
        "seed": seed,
        "num_samples": num_samples,
        "seconds": seconds,
    }


def _write(result, png: Path, npz: Path, ncol: int, trajectory: int, num_samples: int) -> list:
    from ..figures import save_grid, save_trajectory

    with atomic_file(npz, "samples") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=result.images, labels=result.labels)
    with atomic_file(png, "sample grid") as tmp:
        save_grid(result.images, tmp, ncol=ncol, format="png")
    written = [png, npz]
    if trajectory:
        path = png.with_name(png.stem + "_trajectory.png")
        with atomic_file(path, "trajectory figure") as tmp:
            save_trajectory(result.trajectory, result.times, tmp, max_rows=min(num_samples, 10))
        written.append(path)
    return written


def main(args) -> None:
    done = generate(
        args.checkpoint,
        args.out,
        labels=args.labels,
        num_samples=args.num_samples,
        seed=args.seed,
        solver=args.solver,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        batch_size=args.batch_size,
        ncol=args.ncol,
        overwrite=args.overwrite,
        device=device_for(args.cpu),
        trajectory=args.trajectory,
        names=FLAG_NAMES,
    )
    steps = "" if done["solver"] == "dopri5" else f" {done['steps']}"
    say(
        f"{done['num_samples']} samples, {done['solver']}{steps} NFE {done['nfe']}, cfg {done['cfg_scale']:g}, "
        f"seed {done['seed']}, {done['seconds']:.1f} s -> {', '.join(map(str, done['written']))}"
    )
