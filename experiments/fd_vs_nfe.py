"""FD and class accuracy against the number of velocity evaluations (NFE), for every
solver, on one trained model, with the same noise, labels and guidance throughout.

    python experiments/fd_vs_nfe.py --checkpoint runs/NAME --num-samples 1000

(default output: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png; an existing --out needs --overwrite)

Writes the figure, a JSON of every point, and a Markdown table (printed and saved beside
the figure).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from latentflow.classifier import load_classifier  # noqa: E402
from latentflow.evaluate import evaluate_images, real_baseline  # noqa: E402
from latentflow.pipeline import load_pipeline  # noqa: E402
from latentflow.sampling import sample_images  # noqa: E402

GRID = {
    "euler": [4, 8, 16, 32],
    "midpoint": [2, 4, 8, 16],
    "heun": [2, 4, 8, 16],
    "rk4": [1, 2, 4, 8],
    "dopri5": [1e-2, 1e-3, 1e-4],  # tolerances (atol = rtol)
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's sampler.cfg_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="figure path (default: runs/fd_vs_nfe-<timestamp>/fd_vs_nfe.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json/.md")
    args = p.parse_args()
    if args.out is None:
        from latentflow.checkpoint import new_run_dir

        args.out = new_run_dir(Path("runs"), "fd_vs_nfe") / "fd_vs_nfe.png"
    elif args.out.exists() and not args.overwrite:
        sys.exit(f"error: {args.out} already exists; choose another --out or pass --overwrite")

    pipe = load_pipeline(args.checkpoint)
    model, vae, latent_shape = pipe.transformer, pipe.frozen_vae(), pipe.latent_shape
    classifier, cinfo = load_classifier()
    cfg_scale = pipe.config.guidance_scale if args.cfg_scale is None else args.cfg_scale
    labels = [i % 10 for i in range(args.num_samples)]
    rows = []
    for solver, settings in GRID.items():
        for setting in settings:
            kw = dict(atol=setting, rtol=setting) if solver == "dopri5" else dict(steps=setting)
            start = time.perf_counter()
            res = sample_images(model, vae, latent_shape, labels, solver=solver, cfg_scale=cfg_scale,
                                guidance_interval=pipe.config.guidance_interval, seed=args.seed, **kw)
            seconds = time.perf_counter() - start
            m = evaluate_images(res.images, res.labels, classifier)
            rows.append({"solver": solver, "setting": setting, "nfe": res.nfe, "fd": m["fd"],
                         "accuracy": m["accuracy"], "seconds": round(seconds, 1)})
            print(f"{solver:8s} {setting:<8g} NFE {res.nfe:4d}  FD {m['fd']:.3f}  acc {m['accuracy']:.2%}  {seconds:.0f} s",
                  flush=True)
    real = real_baseline(classifier)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for solver in GRID:
        pts = [r for r in rows if r["solver"] == solver]
        axes[0].plot([r["nfe"] for r in pts], [r["fd"] for r in pts], "o-", ms=4, label=solver)
        axes[1].plot([r["nfe"] for r in pts], [100 * r["accuracy"] for r in pts], "o-", ms=4, label=solver)
    axes[0].axhline(real["fd"], color="k", ls="--", lw=1, label="real digits")
    for ax, name in zip(axes, ("FD (classifier features)", "class accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (velocity evaluations; a guided pair counts once)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{type(model).__name__}, cfg {cfg_scale:g}, {args.num_samples} samples, seed {args.seed}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)

    table = ["| solver | steps / tol | NFE | FD | accuracy | time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['solver']} | {r['setting']:g} | {r['nfe']} | {r['fd']:.3f} | {r['accuracy']:.1%} | {r['seconds']} |")
    table.append(f"| real digits (4 500 train vs 500 test) | | | {real['fd']:.3f} | {real['accuracy']:.1%} | |")
    text = "\n".join(table)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"points": rows, "real": real, "cfg_scale": cfg_scale, "num_samples": args.num_samples, "seed": args.seed,
         "checkpoint": str(args.checkpoint), "classifier_test_accuracy": cinfo["test_accuracy"]}, indent=2))


if __name__ == "__main__":
    main()
