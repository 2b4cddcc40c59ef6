"""Sampler sweep: FD to the MNIST test set (with its spread, and as a multiple of the model's
own training data at the same size), precision, recall, class accuracy and the latent
distance from the ODE's converged solution, against the number of velocity evaluations
(NFE) for every solver, and against the guidance scale and interval; the same noise and
labels throughout.

    python experiments/fd_vs_nfe.py --checkpoint runs/NAME --num-samples 10000
    python experiments/fd_vs_nfe.py --checkpoint runs/NAME --grid "euler=1,2,4,8,16 heun=4,8"


(default output: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png; an existing --out needs
--overwrite). Writes the figure, a JSON of every point, and a Markdown table (printed and
saved beside the figure).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from latentflow.evaluation import evaluate_images, feature_net, references_for_run
from latentflow.evaluation.solver import converged_latents, solver_error
from latentflow.figures import new_figure
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


class Sweep:
    def __init__(self, args):
        self.args = args
        self.pipe, cfg, _ = load_pipeline(args.checkpoint, with_info=True)
        channels = int(self.pipe.vae.config.in_channels)
        self.net = feature_net("auto", cfg.data, channels, cfg.data.image_size)
        self.references = references_for_run(cfg.data, self.net, channels)[:1]  # the MNIST test set
        self.labels = [i % self.pipe.num_classes for i in range(args.num_samples)]
        self.converged = {}  # (scale, interval) -> latents of the first --error-samples
        self.rows = []

    def reference_latents(self, scale, interval):
        key = (scale, tuple(interval) if interval else None)
        if key not in self.converged:
            self.converged[key] = converged_latents(
                self.pipe, self.labels, self.args.error_samples, self.args.seed, scale, interval
            )[0]
        return self.converged[key]

    def point(self, kind, solver, setting, scale, interval, with_error=True):
        kw = dict(atol=setting, rtol=setting) if solver == "dopri5" else dict(steps=setting)
        start = time.perf_counter()
        res = self.pipe.draw(
            self.labels,
            len(self.labels),
            solver=solver,
            cfg_scale=scale,
            guidance_interval=list(interval) if interval else [],
            generator=torch.Generator().manual_seed(self.args.seed),
            **kw,
        )
        seconds = time.perf_counter() - start
        m = evaluate_images(res.images, res.labels, self.net, self.references)
        r, pr = next(iter(m["references"].values())), m["precision_recall"]
        error = solver_error(res.latents, self.reference_latents(scale, interval)) if with_error else None
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
            "floor": r["floor"]["fd"],
            "floor_n": r["floor"]["n"],
            "ratio": r["ratio"],
            "precision": pr["precision"],
            "recall": pr["recall"],
            "accuracy": m["accuracy"],
            "latent_rms_error": error["rms"] if error else None,
            "seconds": round(seconds, 1),
        }
        self.rows.append(row)
        if self.args.out is not None:  # kept as it goes: a long sweep that stops loses nothing
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.with_suffix(".partial.json").write_text(json.dumps(self.rows, indent=2))
        print(
            f"{kind:8s} {solver:8s} {setting:<7g} NFE {res.nfe:3d} cfg {scale:<4g} int {str(row['interval']):12s} "
            f"FD {row['fd']:.3f} ± {row['fd_std']:.3f}  x{row['ratio']:.2f}  P {row['precision']:.3f} "
            f"R {row['recall']:.3f}  acc {row['accuracy']:.2%}  err {_maybe(row['latent_rms_error'])}  {seconds:.0f} s",
            flush=True,
        )


def _maybe(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def parse_grid(text: str):
    """``"euler=4,8 dopri5=1e-3"`` -> {"euler": [4, 8], "dopri5": [0.001]}: solver steps, or
    dopri5's tolerances."""
    grid = {}
    for item in text.split():
        name, _, values = item.partition("=")
        if name not in SOLVER_GRID or not values:
            sys.exit(f"error: --grid item {item!r} is not SOLVER=V1,V2 with a solver of {', '.join(SOLVER_GRID)}")
        try:
            grid[name] = [float(v) if name == "dopri5" else int(v) for v in values.split(",")]
        except ValueError:
            sys.exit(f"error: --grid item {item!r} has a value that is not a number")
    return grid


def parse_intervals(text: str, flag: str):
    """``"0.2-1,0.3-0.9"`` -> [(0.2, 1.0), (0.3, 0.9)], each checked."""
    intervals = []
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        try:
            interval = (float(lo), float(hi))
        except ValueError:
            sys.exit(f"error: {flag} item {item!r} is not LO-HI (two numbers, e.g. 0.2-0.9)")
        if not 0.0 <= interval[0] < interval[1] <= 1.0:
            sys.exit(f"error: {flag} item {item!r} needs 0 <= LO < HI <= 1")
        intervals.append(interval)
    return intervals


def draw(rows, path: Path, title: str, solver: str, steps: int) -> None:
    """Four panels (FD, latent error and accuracy against NFE; FD against guidance), or the
    last alone when the sweep had no solver points (``--only guidance``)."""
    with_solvers = any(r["sweep"] == "solver" for r in rows)
    fig, axes = (
        new_figure(1, 4, figsize=(18, 3.8), dpi=110) if with_solvers else new_figure(1, 1, figsize=(6, 4), dpi=110)
    )
    axes = list(axes) if with_solvers else [None, None, None, axes]
    if with_solvers:
        for s_name in SOLVER_GRID:
            pts = [r for r in rows if r["sweep"] == "solver" and r["solver"] == s_name]
            if not pts:
                continue
            nfe = [r["nfe"] for r in pts]
            axes[0].errorbar(
                nfe, [r["fd"] for r in pts], yerr=[r["fd_std"] for r in pts], marker="o", ms=3, capsize=2, label=s_name
            )
            axes[1].plot(nfe, [r["latent_rms_error"] for r in pts], "o-", ms=3, label=s_name)
            axes[2].plot(nfe, [100 * r["accuracy"] for r in pts], "o-", ms=3, label=s_name)
        axes[0].set_ylabel("FD to the MNIST test set")
        axes[1].set_ylabel("latent RMS distance from the converged ODE")
        axes[2].set_ylabel("class accuracy (%)")
        for ax in axes[:3]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("NFE (velocity evaluations; a guided pair counts once)")
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
    for ax in (axes[0], axes[3]):
        if ax is not None:
            ax.axhline(rows[0]["floor"], ls="--", lw=1, color="0.4", label=f"training data ({rows[0]['floor_n']})")
    drawn = {tuple(r["interval"]) if r["interval"] else None for r in rows if r["sweep"] == "guidance"}
    for interval in sorted(drawn, key=lambda i: (i is not None, i or ())):
        want = list(interval) if interval else None
        pts = sorted(
            (r for r in rows if r["sweep"] == "guidance" and (r["interval"] == want or r["cfg_scale"] == 1.0)),
            key=lambda r: r["cfg_scale"],
        )
        if len(pts) < 2:
            continue
        axes[3].errorbar(
            [r["cfg_scale"] for r in pts],
            [r["fd"] for r in pts],
            yerr=[r["fd_std"] for r in pts],
            marker="o",
            ms=3,
            capsize=2,
            label=f"interval {interval or 'all of t'}",
        )
    axes[3].set_ylabel("FD to the MNIST test set")
    axes[3].set_yscale("log")
    axes[3].set_xlabel(f"guidance scale ({solver} {steps})")
    for ax in axes:
        if ax is not None:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10 if with_solvers else 7)
    fig.tight_layout()
    fig.savefig(path)


def table(rows) -> str:
    head = [
        "| sweep | solver | steps / tol | NFE | guidance | interval | FD ± std | × training data | precision "
        "| recall | accuracy | latent RMS error | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r['sweep']} | {r['solver']} | {r['setting']:g} | {r['nfe']} | {r['cfg_scale']:g} | "
        f"{'all' if not r['interval'] else '–'.join(f'{v:g}' for v in r['interval'])} | "
        f"{r['fd']:.3f} ± {r['fd_std']:.3f} | {r['ratio']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
        f"{r['accuracy']:.2%} | {_maybe(r['latent_rms_error'])} | {r['seconds']} |"
        for r in rows
    ]
    return "\n".join(head + lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="an export, a run or a checkpoint")
    p.add_argument("--num-samples", type=int, default=10000, help="samples per point (default 10000)")
    p.add_argument("--error-samples", type=int, default=1000, help="samples for the latent error (default 1000)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance of the solver sweep (default: the model's)")
    p.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO-HI|none",
        help="guidance interval of the solver sweep, e.g. 0.2-1; none: the whole path (default: the model's)",
    )
    p.add_argument("--solver", default=None, help="solver of the guidance sweep (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="steps of the guidance sweep (default: the model's)")
    p.add_argument("--only", choices=("solver", "guidance"), default=None, help="run one of the two sweeps")
    p.add_argument(
        "--grid",
        default=None,
        help='the solver sweep\'s points, e.g. "euler=1,2,4 heun=4,8 dopri5=1e-3" (default: each solver at 4)',
    )
    p.add_argument("--scales", default=None, help="guidance scales of the guidance sweep, e.g. 1,1.5,2 (default 1–3)")
    p.add_argument(
        "--intervals",
        default="all",
        help='guidance intervals besides the whole path: "all" (the four of INTERVALS, default), "none", '
        'or a list such as "0.2-1,0.3-0.9"',
    )
    p.add_argument(
        "--guidance-error",
        action="store_true",
        help="also the latent error in the guidance sweep (a converged solution per scale and interval)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument(
        "--out", type=Path, default=None, help="figure path (default: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json/.md")
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="draw the figure and table from the points of an earlier sweep (its .json or .partial.json)",
    )
    args = p.parse_args()
    grid = parse_grid(args.grid) if args.grid else SOLVER_GRID
    try:
        scales = [float(v) for v in args.scales.split(",")] if args.scales else GUIDANCE_GRID
    except ValueError:
        sys.exit(f"error: --scales {args.scales!r} is not a comma-separated list of numbers")
    if args.intervals in ("all", "none"):
        intervals = INTERVALS if args.intervals == "all" else [None]
    else:
        intervals = [None, *parse_intervals(args.intervals, "--intervals")]  # the whole path first
    if args.out is None:
        from latentflow.runs import new_run_dir

        args.out = new_run_dir(Path("runs"), "fd_vs_nfe") / "fd_vs_nfe.png"
    elif args.out.exists() and not args.overwrite:
        sys.exit(f"error: {args.out} already exists; choose another --out or pass --overwrite")
    if args.replot is not None:
        stored = json.loads(args.replot.read_text())
        rows = stored["points"] if isinstance(stored, dict) else stored
        solver, steps = next(((r["solver"], r["setting"]) for r in rows if r["sweep"] == "guidance"), ("euler", 8))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        title = f"{args.replot.name}: {len(rows)} points"
        if isinstance(stored, dict) and "reference" in stored:
            title = (
                f"{stored['num_samples']} samples, seed {stored['seed']}, against the {stored['reference']}; "
                f"dashed: the model's training data at {rows[0]['floor_n']} images"
            )
        draw(rows, args.out, title, solver, steps)
        args.out.with_suffix(".md").write_text(table(rows) + "\n")
        print(table(rows))
        return
    sweep = Sweep(args)
    c = sweep.pipe.config
    scale = c.guidance_scale if args.cfg_scale is None else args.cfg_scale
    solver, steps = args.solver or c.solver, args.steps or c.num_inference_steps
    interval = c.guidance_interval
    if args.guidance_interval == "none":
        interval = None
    elif args.guidance_interval is not None:
        given = parse_intervals(args.guidance_interval, "--guidance-interval")
        if len(given) > 1:
            sys.exit(f"error: --guidance-interval {args.guidance_interval!r} is more than one interval")
        interval = given[0]
    if args.only != "guidance":
        for s_name, settings in grid.items():
            for setting in settings:
                sweep.point("solver", s_name, setting, scale, interval)
    if args.only != "solver":
        for g in scales:
            for interval in intervals if g != 1.0 else [None]:
                sweep.point("guidance", solver, steps, g, interval, with_error=args.guidance_error)
    rows = sweep.rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"{args.num_samples} samples, seed {args.seed}, against the {sweep.references[0]['stats'].description}; "
        f"dashed: the model's training data at {rows[0]['floor_n']} images"
    )
    draw(rows, args.out, title, solver, steps)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    text = table(rows)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "points": rows,
                "num_samples": args.num_samples,
                "seed": args.seed,
                "checkpoint": str(args.checkpoint),
                "feature_net": sweep.net.identity,
                "reference": sweep.references[0]["stats"].description,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
