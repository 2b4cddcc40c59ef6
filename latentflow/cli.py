"""Command line: ``python main.py [train|sample|evaluate|export|reconstruct|...] ...``.

Argument parsing only: each command calls one application function and prints the line
it returns. ``python main.py`` alone trains the embedded default experiment. A
``LatentflowError`` ends the program with one line on stderr and exit status 2; a training
run stopped by SIGTERM or Ctrl-C exits with 143 or 130 after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import LatentflowError, PeerLost

DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "default.yaml"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _device(args):
    import torch

    return torch.device("cpu" if getattr(args, "cpu", False) or not torch.cuda.is_available() else "cuda")


def _load(args):
    from .config import load_config

    path = args.config if args.config is not None else (DEFAULT_EXPERIMENT if DEFAULT_EXPERIMENT.exists() else None)
    return load_config(path, args.overrides)


# --- commands -------------------------------------------------------------------------------


def cmd_train(args) -> None:
    from .train import Runtime, train

    cfg = _load(args)
    train(cfg, Runtime(args.output_dir, args.resume, args.mixed_precision, args.cpu, args.cache_dir,
                       args.dist_timeout, tuple(args.overrides), tuple(args.argv)))


def cmd_encode(args) -> None:
    from .latents import encode_experiment

    encode_experiment(_load(args), args.cache_dir, args.cpu, args.dist_timeout)


def cmd_toy(args) -> None:
    from .toy import toy

    print(toy(args.data, args.out, steps=args.steps, particles=args.particles, frames=args.frames,
              solver=args.solver, ode_steps=args.ode_steps, seed=args.seed)["summary"])


def cmd_train_vae(args) -> None:
    from .checkpoint import new_run_dir
    from .train_vae import VAETrainArgs, train_vae

    out = args.out or new_run_dir(Path("runs"), "mnist-vae")
    train_vae(VAETrainArgs(out=str(out), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           kl_weight=args.kl_weight, max_items=args.max_items, seed=args.seed,
                           overwrite=args.overwrite), cpu=args.cpu)


def cmd_reconstruct(args) -> None:
    import yaml

    from .reconstruct import reconstruction_check

    data = {}
    for item in args.data:
        key, sep, raw = item.partition("=")
        if not sep:
            raise LatentflowError(f"--data {item!r} is not of the form key=value (e.g. --data source=npz)")
        data[key] = yaml.safe_load(raw)
    print(reconstruction_check(args.vae, args.subfolder, data, args.num_images, args.out, args.overwrite)["summary"])


def cmd_sample(args) -> None:
    from .pipeline import generate

    done = generate(args.checkpoint, args.out, labels=args.labels, num_samples=args.num_samples, seed=args.seed,
                    solver=args.solver, steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                    ncol=args.ncol, overwrite=args.overwrite, device=_device(args), trajectory=args.trajectory)
    steps = "" if done["solver"] == "dopri5" else f" {done['steps']}"
    print(f"{done['num_samples']} samples, {done['solver']}{steps} NFE {done['nfe']}, cfg {done['cfg_scale']:g}, "
          f"seed {done['seed']}, {done['seconds']:.1f} s -> {', '.join(map(str, done['written']))}")


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_model

    report = evaluate_model(args.checkpoint, num_samples=args.num_samples, solver=args.solver, steps=args.steps,
                            cfg_scale=args.cfg_scale, guidance_interval=args.guidance_interval, seed=args.seed,
                            batch_size=args.batch_size, unconditional=args.unconditional,
                            feature_net_choice=args.feature_net, reference=args.reference, out=args.out,
                            overwrite=args.overwrite, device=_device(args))
    print(report["summary"])


def _data_config(args):
    """The data section of --config/--set, with --data key=value on top."""
    import yaml

    from .config import DataConfig, _build

    cfg = _load(args)
    values = {k: v for k, v in vars(cfg.data).items()}
    for item in args.data:
        key, sep, raw = item.partition("=")
        if not sep:
            raise LatentflowError(f"--data {item!r} is not of the form key=value (e.g. --data split=test)")
        values[key] = yaml.safe_load(raw)
    data = _build(DataConfig, values, "data.")
    data.validate()
    return data, cfg


def cmd_fd_stats(args) -> None:
    from .checkpoint import new_run_dir
    from .evaluate import fd_stats_command
    from .vae import FrozenVAE

    data, cfg = _data_config(args)
    channels = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).in_channels
    out = args.out or new_run_dir(Path("runs"), "fd-stats") / f"{data.source}-{data.split}.npz"
    print(fd_stats_command(data, out, args.num_images, args.feature_net, channels, args.overwrite))


def cmd_export(args) -> None:
    from .pipeline import export

    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}  (load it with LatentFlowPipeline.from_pretrained({str(out)!r}))")


def cmd_bench(args) -> None:
    from .bench import BenchSettings, run_bench, write_json

    batches = tuple(int(b) for b in args.batches.split(","))
    settings = BenchSettings(model=args.model, latent_size=args.latent_size, seed_batch=args.seed_batch,
                             batches=batches, window_seconds=args.window_seconds, windows=args.windows,
                             compile=args.compile, tiny=args.tiny)
    if args.json:
        from .runtime import check_output

        check_output(args.json, args.overwrite)
    summary = run_bench(settings, device=_device(args))
    if args.json:
        write_json(summary, args.json)
        print(f"wrote {args.json}")


def cmd_train_classifier(args) -> None:
    from .checkpoint import new_run_dir
    from .classifier import train_classifier

    out = args.out or new_run_dir(Path("runs"), "digit-classifier")
    train_classifier(out, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)


# --- the parser -----------------------------------------------------------------------------


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (default: experiments/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def _add_sampling_args(p: argparse.ArgumentParser, num_samples: int) -> None:
    """Flags shared by `sample` and `evaluate`; unset ones fall back to the model's settings."""
    from .solvers import SOLVERS

    p.add_argument("--checkpoint", type=Path, required=True,
                   help="an export, a run directory (its export, else its newest checkpoint) or a checkpoint")
    p.add_argument("--num-samples", type=int, default=num_samples, help=f"images to draw (default {num_samples})")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="ODE solver (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="steps of a fixed-step solver (default: the model's)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale: 1 conditional, 0 unconditional, >1 guided (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward batch (default 500)")
    p.add_argument("--cpu", action="store_true", help="sample on the CPU even if a GPU is present")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: ...; see --help``) and exit status 2."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments"):  # often a config key given as a flag
            hint = "; experiment settings go through --set, e.g. --set train.epochs=5"
        self.exit(2, f"error: {self.prog}: {message}{hint}; see `{self.prog} --help`\n")


def _interval(text: str):
    """'0.2,0.8' -> [0.2, 0.8]; 'none' -> [] (guide the whole path)."""
    if text.strip().lower() == "none":
        return []
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI such as 0.1,0.8, or 'none'") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO < HI <= 1")
    return [lo, hi]


def _sub(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    invoked = os.path.basename(sys.argv[0])
    parser = _Parser(
        prog=invoked if invoked == "latentflow" else "python main.py", description="latentflow: latent flow matching trainer",
        epilog="example:\n  python main.py                       train the embedded default\n"
               "  python main.py sample --help         one command's flags",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = _sub(sub, "train", "train a velocity model (the default command)",
             "python main.py train --config experiments/smoke.yaml --set train.epochs=3")
    _add_experiment_args(p)
    p.add_argument("--output-dir", type=Path, default=Path("runs"), help="parent of run directories (default: runs)")
    p.add_argument("--resume", default=None, metavar="latest|DIR",
                   help="continue a run: 'latest' (newest run of this experiment), a run dir or a checkpoint dir")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="default: the launcher's setting, else bf16 where the hardware runs it natively")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="latent cache directory (default: $LATENTFLOW_CACHE or ~/.cache/latentflow)")
    p.add_argument("--dist-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long a process waits for the others before the job fails (default 180)")
    p.set_defaults(func=cmd_train)

    p = _sub(sub, "encode", "build an experiment's latent cache without training (every launched process encodes its shards)",
             "python main.py launch --num_processes 2 -- encode --config experiments/mnist-full.yaml")
    _add_experiment_args(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="latent cache directory (default: $LATENTFLOW_CACHE or ~/.cache/latentflow)")
    p.add_argument("--cpu", action="store_true", help="encode on the CPU even if a GPU is present")
    p.add_argument("--dist-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long a process waits for the others in a collective (default 180)")
    p.set_defaults(func=cmd_encode)

    p = _sub(sub, "sample", "draw samples from an export, a run or a checkpoint",
             "python main.py sample --checkpoint runs/default-20261123-101500 --labels 3,7 --num-samples 20")
    _add_sampling_args(p, num_samples=100)
    p.add_argument("--labels", default=None,
                   help="'3', '0,1,2' (cycled), 'all' (classes in turn; the default) or 'none' (unconditional)")
    p.add_argument("--ncol", type=int, default=None, help="grid columns (default: 10)")
    p.add_argument("--trajectory", type=int, default=0, metavar="K",
                   help="also draw x_t at K times along the path, one row per sample (OUT_trajectory.png)")
    p.add_argument("--out", type=Path, default=None,
                   help="FILE.png or FILE.npz; both are written (default: RUN/samples/<settings>.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_sample)

    p = _sub(sub, "evaluate", "FD and class accuracy of samples against real digits",
             "python main.py evaluate --checkpoint runs/default-20261123-101500 --num-samples 5000")
    _add_sampling_args(p, num_samples=5000)
    p.add_argument("--guidance-interval", type=_interval, default=None, metavar="LO,HI",
                   help="guide only for t in [LO, HI]; 'none' guides the whole path (default: the model's)")
    p.add_argument("--unconditional", action="store_true", help="sample without labels (FD only)")
    p.add_argument("--feature-net", choices=("auto", "digits", "inception"), default="auto",
                   help="feature space of FD: the shipped digit classifier for MNIST, Inception where its weights "
                        "are local (default: auto)")
    p.add_argument("--reference", type=Path, default=None,
                   help="an FD statistics file (python main.py fd-stats) instead of the run data's train and "
                        "held-out references")
    p.add_argument("--out", type=Path, default=None, help="JSON report path (default: RUN/eval/<settings>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out report")
    p.set_defaults(func=cmd_evaluate)

    p = _sub(sub, "fd-stats", "reference statistics (mean, covariance of features) of a dataset for evaluate",
             "python main.py fd-stats --data split=train --out runs/mnist-train.npz")
    _add_experiment_args(p)
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="data settings on top of the experiment's, e.g. --data split=test (default: the "
                        "experiment's data)")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images (default: all)")
    p.add_argument("--feature-net", choices=("auto", "digits", "inception"), default="auto",
                   help="feature space (default: auto, as evaluate picks it)")
    p.add_argument("--out", type=Path, default=None, help="the .npz to write (default: runs/fd-stats-<time>/...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_fd_stats)

    p = _sub(sub, "export", "write a LatentFlowPipeline directory from any checkpoint, run or export",
             "python main.py export --checkpoint runs/default-20261123-101500/checkpoints/step_00001400 --out my-pipe")
    p.add_argument("--checkpoint", type=Path, required=True, help="a run directory, a checkpoint or an export")
    p.add_argument("--out", type=Path, required=True, help="the pipeline directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = _sub(sub, "reconstruct", "VAE reconstruction sanity check: PSNR, SSIM, latent stats, figure",
             "python main.py reconstruct --vae embedded --num-images 500")
    p.add_argument("--vae", default="embedded", help="'embedded', a local diffusers directory or a Hub id")
    p.add_argument("--subfolder", default=None, help="subfolder of --vae holding the VAE (e.g. 'vae')")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="data settings as in the data: section, e.g. --data source=npz --data path=x.npz "
                        "(default: bundled MNIST test split)")
    p.add_argument("--num-images", type=int, default=500, help="images to reconstruct (default 500)")
    p.add_argument("--out", type=Path, default=None,
                   help="figure path (default: runs/reconstruct-<timestamp>/reconstruction.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out figure")
    p.set_defaults(func=cmd_reconstruct)

    p = _sub(sub, "bench", "training throughput: the baseline loop against latentflow's",
             "python main.py bench --model DiT-B/2 --latent-size 4 --json runs/bench.json")
    p.add_argument("--model", default="DiT-B/2", help="a registered model preset (default DiT-B/2)")
    p.add_argument("--latent-size", type=int, default=4,
                   help="latent side: 4 for 32 px MNIST through an SD VAE, 32 for ImageNet-256")
    p.add_argument("--seed-batch", type=int, default=32, help="batch of the baseline loop (default 32)")
    p.add_argument("--batches", default="32,64,128,256", help="batch sizes for the sweep (default 32,64,128,256)")
    p.add_argument("--window-seconds", type=float, default=2.0, help="length of a timed window (default 2)")
    p.add_argument("--windows", type=int, default=3, help="timed windows per configuration (default 3)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on tiny models (for tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--cpu", action="store_true", help="benchmark the CPU even if a GPU is present")
    p.set_defaults(func=cmd_bench)

    p = _sub(sub, "toy", "the 2-D toy flow: an MLP velocity field on points, with a GIF of the flow",
             "python main.py toy --data checkerboard --out runs/toy-checkerboard")
    p.add_argument("--data", choices=("moons", "checkerboard", "8gaussians"), default="moons", help="2-D data (default moons)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--particles", type=int, default=2000, help="points to carry from noise to data (default 2000)")
    p.add_argument("--frames", type=int, default=40, help="frames of the GIF (default 40)")
    p.add_argument("--solver", choices=("euler", "midpoint", "heun", "rk4"), default="heun", help="ODE solver (default heun)")
    p.add_argument("--ode-steps", type=int, default=40, help="solver steps (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/toy-<data>-<timestamp>)")
    p.set_defaults(func=cmd_toy)

    p = _sub(sub, "train-vae", "train a small MNIST AutoencoderKL like the one latentflow ships",
             "python main.py train-vae --epochs 20")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/mnist-vae-<timestamp>)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the 4 500 training digits (default 20)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (default 1e-6)")
    p.add_argument("--max-items", type=int, default=None, help="train on the first N digits only")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.set_defaults(func=cmd_train_vae)

    p = _sub(sub, "train-classifier", "train the digit classifier that evaluate uses as its feature net",
             "python main.py train-classifier --epochs 15")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/digit-classifier-<timestamp>)")
    p.add_argument("--epochs", type=int, default=15, help="epochs (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_train_classifier)
    return parser


# Flag values that parse but cannot be used: (name, test, what it must be).
_FLAG_RULES = [
    (("num_samples", "steps", "num_images", "epochs", "batch_size", "ncol", "windows", "seed_batch",
      "max_items", "latent_size", "particles", "frames", "ode_steps"), lambda v: v >= 1, "an integer >= 1"),
    (("trajectory", "seed"), lambda v: v >= 0, "an integer >= 0"),
    (("dist_timeout", "lr", "window_seconds"), lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    (("cfg_scale", "kl_weight"), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
]


def _check_flags(args) -> Optional[str]:
    for names, ok, must in _FLAG_RULES:
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                return f"--{name.replace('_', '-')} must be {must}, got {value}"
    if getattr(args, "command", None) == "bench":
        from .models import MODELS

        if args.model not in MODELS:
            return f"--model {args.model!r} is not a registered model; choose one of {', '.join(MODELS)}"
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            return f"--batches {args.batches!r}: expected batch sizes like 32,64,128"
        if not batches or min(batches) < 1:
            return f"--batches {args.batches!r}: batch sizes must be >= 1"
    return None


def _quiet_libraries() -> None:
    """Library warnings (diffusers' loading notes) would break the one-line error rule."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()


def _report_error(message: str) -> None:
    """One line on stderr; under ``main.py launch`` also into the file the launcher reads."""
    path = os.environ.get("LATENTFLOW_ERROR_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')}\t{message.replace(chr(10), ' ')}\n")
        return
    print(f"error: {message}", file=sys.stderr)


LAUNCH_HELP = """usage: python main.py launch [accelerate launch flags] -- [main.py arguments]

Run latentflow under Accelerate's launcher (several processes or GPUs, several machines),
in this process, so that a worker's error ends the launch in one line with exit status 2.
Launch flags are Accelerate's: --num_processes N, --config_file FILE, --mixed_precision,
--num_machines, --machine_rank, --main_process_ip, --main_process_port, ...

example:
  python main.py launch --num_processes 2 -- --config experiments/smoke.yaml
  python main.py launch --config_file experiments/accelerate/multi-gpu.yaml -- --set train.epochs=10
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(LAUNCH_HELP)
            return 0
        from .launch import launch

        rest = argv[1:]
        split = rest.index("--") if "--" in rest else len(rest)
        try:
            return launch(rest[:split], rest[split + 1 :])
        except LatentflowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    args.argv = argv[1:] if argv and argv[0] == "train" else argv
    problem = _check_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    _quiet_libraries()
    from .train import Interrupted

    try:
        args.func(args)
    except LatentflowError as exc:
        if _is_main_rank():
            _report_error(str(exc))
        elif isinstance(exc, PeerLost) or getattr(exc, "local", False):  # only this rank knows it
            _report_error(f"process {os.environ.get('RANK')}: {exc}")
        return 2
    except Interrupted as exc:
        if _is_main_rank():
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if _is_main_rank():
            print("interrupted: completed checkpoints and outputs are intact", file=sys.stderr)
        return 130
    return 0
