"""Sampler sweep: FD (with its spread and the real-data floor) and class accuracy of one
trained model against the number of velocity evaluations (NFE) for every solver, and against
the guidance scale and guidance interval, with the same noise and labels throughout.

    python experiments/fd_vs_nfe.py --checkpoint runs/NAME --num-samples 5000

(default output: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png; an existing --out needs
--overwrite). Writes the figure, a JSON of every point, and a Markdown table (printed and
saved beside the figure). FD is against the training set's statistics; "x floor" compares
FD at the floor's sample size with the FD of held-out real digits at that size.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from latentflow.evaluation import evaluate_images, feature_net, references_for_run
from latentflow.pipeline import load_pipeline

SOLVER_GRID = {
    "euler": [4, 8, 16, 32],
    "midpoint": [2, 4, 8, 16],
    "heun": [2, 4, 8, 16],
    "rk4": [1, 2, 4, 8],
    "dopri5": [1e-2, 1e-3, 1e-4],  # tolerances (atol = rtol)
}
GUIDANCE_GRID = [1.0, 1.25, 1.5, 2.0, 3.0]
INTERVALS = [None, (0.0, 0.7), (0.1, 0.8), (0.3, 1.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="an export, a run or a checkpoint")
    p.add_argument("--num-samples", type=int, default=5000, help="samples per point (default 5000)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance of the solver sweep (default: the model's)")
    p.add_argument("--solver", default=None, help="solver of the guidance sweep (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="steps of the guidance sweep (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument(
        "--out", type=Path, default=None, help="figure path (default: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json/.md")
    args = p.parse_args()
    if args.out is None:
        from latentflow.runs import new_run_dir

        args.out = new_run_dir(Path("runs"), "fd_vs_nfe") / "fd_vs_nfe.png"
    elif args.out.exists() and not args.overwrite:
        sys.exit(f"error: {args.out} already exists; choose another --out or pass --overwrite")

    pipe, cfg, _ = load_pipeline(args.checkpoint, with_info=True)
    c = pipe.config
    net = feature_net("auto", cfg.data, int(pipe.vae.config.in_channels), cfg.data.image_size)
    references = references_for_run(cfg.data, net, int(pipe.vae.config.in_channels))[:1]  # the training set
    scale = c.guidance_scale if args.cfg_scale is None else args.cfg_scale
    solver, steps = args.solver or c.solver, args.steps or c.num_inference_steps
    labels = [i % pipe.num_classes for i in range(args.num_samples)]
    rows = []

    def point(kind, solver, setting, scale, interval):
        kw = dict(atol=setting, rtol=setting) if solver == "dopri5" else dict(steps=setting)
        start = time.perf_counter()
        res = pipe.draw(
            labels,
            len(labels),
            solver=solver,
            cfg_scale=scale,
            guidance_interval=interval or [],
            generator=torch.Generator().manual_seed(args.seed),
            **kw,
        )
        seconds = time.perf_counter() - start
        m = evaluate_images(res.images, res.labels, net, references)
        r = m["references"]["train"]
        row = {
            "sweep": kind,
            "solver": solver,
            "setting": setting,
            "nfe": res.nfe,
            "cfg_scale": scale,
            "interval": list(interval) if interval else None,
            "fd": r["fd"],
            "fd_std": r["fd_std"],
            "matched_fd": r["matched"]["fd"],
            "matched_std": r["matched"]["std"],
            "floor": r["floor"]["fd"],
            "floor_std": r["floor"]["std"],
            "ratio": r["ratio"],
            "accuracy": m["accuracy"],
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"{kind:8s} {solver:8s} {setting:<7g} NFE {res.nfe:3d} cfg {scale:<4g} int {str(row['interval']):12s} "
            f"FD {row['fd']:.3f} ± {row['fd_std']:.3f}  x{row['ratio']:.2f}  acc {row['accuracy']:.2%}  "
            f"{seconds:.0f} s",
            flush=True,
        )

    for s_name, settings in SOLVER_GRID.items():
        for setting in settings:
            point("solver", s_name, setting, scale, c.guidance_interval)
    for g in GUIDANCE_GRID:
        for interval in INTERVALS if g != 1.0 else [None]:
            point("guidance", solver, steps, g, interval)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), dpi=120)
    for s_name in SOLVER_GRID:
        pts = [r for r in rows if r["sweep"] == "solver" and r["solver"] == s_name]
        axes[0].errorbar(
            [r["nfe"] for r in pts],
            [r["fd"] for r in pts],
            yerr=[r["fd_std"] for r in pts],
            marker="o",
            ms=3,
            capsize=2,
            label=s_name,
        )
        axes[1].plot([r["nfe"] for r in pts], [100 * r["accuracy"] for r in pts], "o-", ms=3, label=s_name)
    for interval in INTERVALS:
        pts = [
            r
            for r in rows
            if r["sweep"] == "guidance"
            and (r["interval"] == (list(interval) if interval else None) or r["cfg_scale"] == 1.0)
        ]
        pts = sorted(pts, key=lambda r: r["cfg_scale"])
        axes[2].errorbar(
            [r["cfg_scale"] for r in pts],
            [r["fd"] for r in pts],
            yerr=[r["fd_std"] for r in pts],
            marker="o",
            ms=3,
            capsize=2,
            label=f"interval {interval or 'all of t'}",
        )
    floor = rows[0]
    for ax in (axes[0], axes[2]):
        ax.set_ylabel("FD to the training set")
        ax.set_yscale("log")
    axes[1].set_ylabel("class accuracy (%)")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (velocity evaluations; a guided pair counts once)")
    axes[2].set_xlabel(f"guidance scale ({solver} {steps})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{args.num_samples} samples, seed {args.seed}; floor at {references[0]['floor'].shape[0]} real "
        f"held-out digits {floor['floor']:.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)

    head = [
        "| sweep | solver | steps / tol | NFE | guidance | interval | FD ± std | FD at floor size ± std "
        "| × floor | accuracy | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r['sweep']} | {r['solver']} | {r['setting']:g} | {r['nfe']} | {r['cfg_scale']:g} | "
        f"{'all' if not r['interval'] else '–'.join(f'{v:g}' for v in r['interval'])} | "
        f"{r['fd']:.3f} ± {r['fd_std']:.3f} | "
        f"{r['matched_fd']:.3f} ± {r['matched_std']:.3f} | {r['ratio']:.2f} | {r['accuracy']:.1%} | {r['seconds']} |"
        for r in rows
    ]
    text = "\n".join(
        head
        + lines
        + [f"| real held-out digits (floor) | | | | | | | {floor['floor']:.3f} ± {floor['floor_std']:.3f} | 1.00 | | |"]
    )
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "points": rows,
                "num_samples": args.num_samples,
                "seed": args.seed,
                "checkpoint": str(args.checkpoint),
                "feature_net": net.identity,
                "reference": references[0]["stats"].description,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
