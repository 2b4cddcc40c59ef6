"""Command line: ``python main.py [train|train-vae|reconstruct|sample] ...``.

``python main.py`` alone trains the embedded default experiment. Experiment settings come
from ``--config FILE`` and ``--set section.key=value``; flags say where and how to run.
A ``LatentflowError`` (bad config, data, path or checkpoint) ends the program with one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import LatentflowError

DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "default.yaml"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (default: experiments/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def _load(args):
    from .config import load_config

    path = args.config if args.config is not None else (DEFAULT_EXPERIMENT if DEFAULT_EXPERIMENT.exists() else None)
    return load_config(path, args.overrides)


def cmd_train(args) -> None:
    from .train import Runtime, train

    cfg = _load(args)
    train(cfg, Runtime(args.output_dir, args.resume, args.mixed_precision, args.cpu, args.cache_dir))


def cmd_train_vae(args) -> None:
    from .train_vae import VAETrainArgs, train_vae

    out = args.out or Path("runs") / f"mnist-vae-{time.strftime('%Y%m%d-%H%M%S')}"
    train_vae(
        VAETrainArgs(out=str(out), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     kl_weight=args.kl_weight, max_items=args.max_items, seed=args.seed, overwrite=args.overwrite),
        cpu=args.cpu,
    )


def cmd_reconstruct(args) -> None:
    from .config import DataConfig, _build
    from .reconstruct import reconstruct
    from .vae import FrozenVAE

    import yaml

    values = {"split": "test"}
    for item in args.data:
        key, _, raw = item.partition("=")
        values[key] = yaml.safe_load(raw)
    data = _build(DataConfig, values, "data.")
    data.validate()
    vae = FrozenVAE.from_pretrained(args.vae, args.subfolder)
    figure = args.out or Path("runs") / f"reconstruct-{time.strftime('%Y%m%d-%H%M%S')}" / "reconstruction.png"
    metrics = reconstruct(vae, data, figure, num_images=args.num_images)
    print(
        f"VAE {args.vae}: PSNR {metrics['psnr']:.2f} dB (pooled {metrics['psnr_pooled']:.2f} dB), "
        f"SSIM {metrics['ssim']:.4f} on {metrics['num_images']} images; scaled latents "
        f"{tuple(metrics['latent_shape'])} mean {metrics['latent_mean']:+.3f} std {metrics['latent_std']:.3f}; "
        f"figure {figure}"
    )
    figure.with_suffix(".json").write_text(json.dumps({"vae": args.vae, "data": vars(data), **metrics}, indent=2))


def _parse_labels(text: Optional[str], num_samples: int, num_classes: int) -> Optional[List[int]]:
    """'3' -> every sample a 3; '0,1,2' -> cycled; 'all' -> classes in turn; None -> all classes
    in turn when the model is conditional, unconditional otherwise."""
    if text is None or text == "all":
        return None if num_classes == 0 else [i % num_classes for i in range(num_samples)]
    if text == "none":
        return None
    try:
        chosen = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LatentflowError(f"--labels {text!r}: expected integers like 3 or 0,1,2, or 'all'/'none'") from None
    bad = [v for v in chosen if not 0 <= v < num_classes]
    if not chosen or bad:
        raise LatentflowError(f"--labels {text!r}: labels must lie in 0..{num_classes - 1} for this model")
    return [chosen[i % len(chosen)] for i in range(num_samples)]


def _device(args):
    import torch

    return torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")


def _draw(args, labels_for):
    """Sample from ``args.checkpoint`` with the sampling flags; flags left unset fall back to
    the run's sampler config. ``labels_for(num_classes)`` picks the labels (or None)."""
    from .sampling import load_generator, sample_images

    model, vae, cfg, info, latent_shape = load_generator(args.checkpoint, _device(args))
    labels = labels_for(info.get("num_classes", 10))
    s = {"solver": args.solver or cfg.sampler.solver, "steps": args.steps or cfg.sampler.steps,
         "cfg_scale": cfg.sampler.cfg_scale if args.cfg_scale is None else args.cfg_scale,
         "guidance_interval": cfg.sampler.guidance_interval}
    if s["cfg_scale"] < 0:
        raise LatentflowError(f"--cfg-scale {s['cfg_scale']}: must be >= 0 (1 = no guidance)")
    if labels is None:
        s["cfg_scale"] = 0.0  # no labels: the unconditional velocity, which is guidance scale 0
    start = time.perf_counter()
    result = sample_images(
        model, vae, latent_shape, labels, args.num_samples, atol=cfg.sampler.atol, rtol=cfg.sampler.rtol,
        seed=args.seed, batch_size=args.batch_size, **s,
    )
    s["seconds"] = time.perf_counter() - start
    return result, s


def cmd_sample(args) -> None:
    import numpy as np

    from .figures import save_grid

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise LatentflowError(f"--out {out}: give a .png (grid) or .npz (arrays) path; both are written")
    png, npz = out.with_suffix(".png"), out.with_suffix(".npz")
    existing = [str(p) for p in (png, npz) if p.exists()]
    if existing and not args.overwrite:
        raise LatentflowError(f"{', '.join(existing)} already exist; choose another --out or pass --overwrite")
    result, s = _draw(args, lambda num_classes: _parse_labels(args.labels, args.num_samples, num_classes))
    solver, steps, cfg_scale, seconds = s["solver"], s["steps"], s["cfg_scale"], s["seconds"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, images=result.images, labels=result.labels)
    save_grid(result.images, png, ncol=args.ncol or min(10, args.num_samples))
    print(
        f"{args.num_samples} samples, {solver} {steps if solver != 'dopri5' else ''} NFE {result.nfe}, "
        f"cfg {cfg_scale}, seed {args.seed}, {seconds:.1f} s -> {png}, {npz}"
    )


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_images, real_baseline
    from .classifier import load_classifier

    def balanced(num_classes):
        return None if num_classes == 0 or args.unconditional else [i % num_classes for i in range(args.num_samples)]

    classifier, classifier_info = load_classifier()
    result, s = _draw(args, balanced)
    solver, steps, cfg_scale, seconds = s["solver"], s["steps"], s["cfg_scale"], s["seconds"]
    metrics = evaluate_images(result.images, result.labels, classifier, inception=args.inception)
    baseline = real_baseline(classifier)
    report = {
        **metrics,
        "real_fd": baseline["fd"],
        "settings": {"solver": solver, "steps": steps if solver != "dopri5" else None, "nfe": result.nfe,
                     "cfg_scale": cfg_scale, "guidance_interval": s["guidance_interval"],
                     "seed": args.seed, "num_samples": args.num_samples,
                     "labels": "unconditional" if (result.labels < 0).all() else "balanced, i % num_classes"},
        "reference": "bundled MNIST test split (500 digits); features: shipped digit classifier (128-d)",
        "classifier_test_accuracy": classifier_info["test_accuracy"],
        "real_baseline": baseline,
        "sampling_seconds": round(seconds, 1),
        "checkpoint": str(args.checkpoint),
    }
    ckpt = Path(args.checkpoint)
    run_dir = ckpt.parent if ckpt.name == "export" else ckpt
    out = args.out or run_dir / "eval" / f"{solver}-{steps}-cfg{cfg_scale:g}-n{args.num_samples}-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    acc = f"accuracy {metrics['accuracy']:.2%}  |  " if "accuracy" in metrics else ""
    print(
        f"FD {metrics['fd']:.3f} (real digits: {baseline['fd']:.3f})  |  {acc}{solver} "
        f"{'' if solver == 'dopri5' else steps} NFE {result.nfe}, cfg {cfg_scale:g}, seed {args.seed}, "
        f"{args.num_samples} samples in {seconds:.0f} s  |  classifier test accuracy "
        f"{classifier_info['test_accuracy']:.2%}  ->  {out}"
    )


def cmd_bench(args) -> None:
    from .bench import BenchSettings, run_bench, write_json

    batches = tuple(int(b) for b in args.batches.split(","))
    settings = BenchSettings(model=args.model, latent_size=args.latent_size, seed_batch=args.seed_batch,
                             batches=batches, window_seconds=args.window_seconds, windows=args.windows,
                             compile=args.compile, tiny=args.tiny)
    summary = run_bench(settings, device=_device(args))
    if args.json:
        write_json(summary, args.json)
        print(f"wrote {args.json}")


def cmd_train_classifier(args) -> None:
    from .classifier import train_classifier

    train_classifier(args.out, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)


def _add_sampling_args(p: argparse.ArgumentParser, num_samples: int) -> None:
    """Flags shared by `sample` and `evaluate`; unset ones fall back to the run's config."""
    from .solvers import SOLVERS

    p.add_argument("--checkpoint", type=Path, required=True, help="a run directory or its export/")
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default: the run's sampler.solver")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sampler.steps")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's sampler.cfg_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="python main.py", description="latentflow: latent flow matching trainer")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train a velocity model (the default command)")
    _add_experiment_args(p)
    p.add_argument("--output-dir", type=Path, default=Path("runs"), help="parent of run directories (default: runs)")
    p.add_argument("--resume", default=None, metavar="latest|DIR", help="continue a run: 'latest', a run dir or a checkpoint")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="default: the launcher's setting, else bf16 where supported")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--cache-dir", type=Path, default=None, help="latent cache directory (default: $LATENTFLOW_CACHE or ~/.cache/latentflow)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-vae", help="train the small MNIST AutoencoderKL that ships in latentflow/assets")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/mnist-vae-<timestamp>)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--max-items", type=int, default=None, help="train on the first N digits only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("reconstruct", help="VAE reconstruction sanity check: PSNR, SSIM, latent stats, figure")
    p.add_argument("--vae", default="embedded", help="'embedded', a local diffusers directory or a Hub id")
    p.add_argument("--subfolder", default=None)
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="data settings as in the data: section, e.g. --data source=npz --data path=x.npz (default: bundled MNIST test split)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--out", type=Path, default=None, help="figure path (default: runs/reconstruct-<timestamp>/reconstruction.png)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("evaluate", help="FD and class accuracy of samples, against held-out real digits")
    _add_sampling_args(p, num_samples=5000)
    p.add_argument("--unconditional", action="store_true", help="sample without labels (FD only)")
    p.add_argument("--inception", action="store_true", help="also Inception FID (needs its weights locally)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: RUN/eval/<settings>.json)")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="training throughput: the seed-style loop against latentflow's")
    p.add_argument("--model", default="DiT-B/2", help="a registered model preset (default DiT-B/2)")
    p.add_argument("--latent-size", type=int, default=4, help="latent side: 4 for 32 px MNIST through an SD VAE, 32 for ImageNet-256")
    p.add_argument("--seed-batch", type=int, default=32)
    p.add_argument("--batches", default="32,64,128,256", help="batch sizes for the sweep (d)")
    p.add_argument("--window-seconds", type=float, default=2.0)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on tiny models (for tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-classifier", help="train the digit classifier used by evaluate")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("sample", help="draw samples from a run or an export")
    _add_sampling_args(p, num_samples=100)
    p.add_argument("--labels", default=None, help="'3', '0,1,2' (cycled), 'all' (default) or 'none' (unconditional)")
    p.add_argument("--ncol", type=int, default=None, help="grid columns (default: 10)")
    p.add_argument("--out", required=True, help="output path; FILE.png and FILE.npz are both written")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    for flag in ("num_samples", "steps", "num_images", "epochs", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2

    def on_sigterm(signum, frame):  # let SIGTERM unwind like Ctrl-C: checkpoints stay complete
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args.func(args)
    except LatentflowError as exc:
        if _is_main_rank():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_main_rank():
            print("interrupted: completed checkpoints are intact; continue with --resume latest", file=sys.stderr)
        return 130
    return 0
