"""Command line: ``python main.py [train|sample|evaluate|export|...] ...``.

Argument parsing only. The commands and their flags are a table (``COMMANDS``); each entry
names the module of ``latentflow.commands`` whose ``main(args)`` runs it, imported only when
that command runs, so ``--help`` answers without loading torch. ``python main.py`` alone
trains the embedded default experiment. A ``LatentflowError`` ends the program with one
line on stderr and exit status 2; a training run stopped by SIGTERM or Ctrl-C exits with 143
or 130 after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import LatentflowError, PeerLost, printable

# Choices the flags offer, spelled here so that parsing imports no torch (a test keeps them equal)
SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5", "meanflow")  # solvers.SOLVERS
FEATURE_NETS = ("auto", "digits", "digits-pooled", "inception")  # evaluation.features.FEATURE_NETS


def arg(*flags: str, **kwargs) -> Tuple[Tuple[str, ...], dict]:
    return flags, kwargs


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


def _assignment(text: str):
    """'split=test' -> ('split', 'test'), the value read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form key=value (e.g. --data split=test)")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot read the value as YAML") from None


# --- the flags, in groups that several commands share -----------------------------------------

CACHE_DIR = arg(
    "--cache-dir",
    type=Path,
    default=None,
    help="latent cache directory (default: $LATENTFLOW_CACHE or ~/.cache/latentflow)",
)


def cpu(what: str):
    return arg("--cpu", action="store_true", help=f"{what} on the CPU even if a GPU is present")


def overwrite(what: str):
    return arg("--overwrite", action="store_true", help=f"replace {what}")


EXPERIMENT = (
    arg(
        "--config",
        default=None,
        metavar="FILE|NAME",
        help="experiment: a YAML file or a built-in name such as smoke (default: default)",
    ),
    arg(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    ),
)
DATA = arg(
    "--data",
    action="extend",
    nargs="+",
    type=_assignment,
    default=[],
    metavar="KEY=VALUE",
    help="data settings on top of the experiment's, e.g. --data split=test source=npz",
)


def sampling(num_samples: int):
    """Flags shared by `sample` and `evaluate`; unset ones fall back to the model's settings."""
    return (
        arg(
            "--checkpoint",
            type=Path,
            required=True,
            help="an export, a run directory (its export, else its newest checkpoint) or a checkpoint",
        ),
        arg("--num-samples", type=int, default=num_samples, help=f"images to draw (default {num_samples})"),
        arg(
            "--solver",
            choices=SOLVERS,
            default=None,
            help="ODE solver, or meanflow for a model trained to jump (default: the model's)",
        ),
        arg("--steps", type=int, default=None, help="steps of a fixed-step solver (default: the model's)"),
        arg(
            "--cfg-scale",
            type=float,
            default=None,
            help="guidance scale: 1 conditional, 0 unconditional, >1 guided (default: the model's)",
        ),
        arg("--seed", type=int, default=0, help="seed of the noise (default 0)"),
        arg("--batch-size", type=int, default=500, help="images per forward batch (default 500)"),
        cpu("sample"),
    )


FEATURE_NET = arg(
    "--feature-net",
    default="auto",
    metavar="{" + ",".join(FEATURE_NETS) + "}|DIR",
    help="feature space: the shipped digit net for MNIST (digits; digits-pooled is the earlier one), Inception "
    "where its weights are local, or a net from train-classifier for other data (default: auto)",
)


@dataclass(frozen=True)
class Command:
    module: str  # latentflow.commands.<module>.main(args) runs it
    help: str
    example: str
    args: Tuple = ()


COMMANDS: Dict[str, Command] = {
    "train": Command(
        "train",
        "train a velocity model (the default command)",
        "python main.py train --config smoke --set train.epochs=3",
        (
            *EXPERIMENT,
            arg("--output-dir", type=Path, default=Path("runs"), help="parent of run directories (default: runs)"),
            arg(
                "--resume",
                default=None,
                metavar="latest|DIR",
                help="continue a run: 'latest' (newest run of this experiment), a run dir or a checkpoint dir",
            ),
            arg(
                "--mixed-precision",
                choices=("no", "bf16", "fp16"),
                default=None,
                help="default: the launcher's setting, else bf16 where the hardware runs it natively",
            ),
            cpu("train"),
            CACHE_DIR,
            arg(
                "--dist-timeout",
                type=float,
                default=180.0,
                metavar="SECONDS",
                help="how long a process waits for the others before the job fails (default 180)",
            ),
        ),
    ),
    "encode": Command(
        "encode",
        "build an experiment's latent cache without training (every launched process encodes its shards)",
        "python main.py launch --num_processes 2 -- encode --config mnist-full",
        (
            *EXPERIMENT,
            CACHE_DIR,
            cpu("encode"),
            arg(
                "--dist-timeout",
                type=float,
                default=180.0,
                metavar="SECONDS",
                help="how long a process waits for the others in a collective (default 180)",
            ),
        ),
    ),
    "sample": Command(
        "sample",
        "draw samples from an export, a run or a checkpoint",
        "python main.py sample --checkpoint runs/default-20261123-101500 --labels 3,7 --num-samples 20",
        (
            *sampling(100),
            arg(
                "--labels",
                default=None,
                help="'3', '0,1,2' or class names (cycled), 'all' (classes in turn; the "
                "default) or 'none' (unconditional)",
            ),
            arg("--ncol", type=int, default=None, help="grid columns (default: 10)"),
            arg(
                "--trajectory",
                type=int,
                default=0,
                metavar="K",
                help="also draw x_t at K times along the path, one row per sample (OUT_trajectory.png)",
            ),
            arg(
                "--out",
                type=Path,
                default=None,
                help="FILE.png or FILE.npz; both are written (default: RUN/samples/<settings>.png)",
            ),
            overwrite("existing output files"),
        ),
    ),
    "evaluate": Command(
        "evaluate",
        "FD and class accuracy of samples against real digits",
        "python main.py evaluate --checkpoint runs/default-20261123-101500 --num-samples 5000",
        (
            *sampling(5000),
            arg(
                "--guidance-interval",
                type=_interval,
                default=None,
                metavar="LO,HI",
                help="guide only for t in [LO, HI]; 'none' guides the whole path (default: the model's)",
            ),
            arg("--unconditional", action="store_true", help="sample without labels (FD only)"),
            FEATURE_NET,
            arg(
                "--set",
                dest="overrides",
                action="append",
                default=[],
                metavar="data.KEY=VALUE",
                help="read the real images with other data settings than the run's, e.g. --set data.path=DIR",
            ),
            arg(
                "--reference",
                type=Path,
                default=None,
                help="an FD statistics file (python main.py fd-stats) instead of the default references",
            ),
            arg(
                "--solver-error",
                type=int,
                default=0,
                metavar="N",
                help="also the RMS distance of N samples' latents from the converged ODE solution (dopri5, "
                "tolerance 1e-6); 0: off",
            ),
            arg("--out", type=Path, default=None, help="JSON report path (default: RUN/eval/<settings>.json)"),
            overwrite("an existing report (--out, or the default one under the run)"),
        ),
    ),
    "fd-stats": Command(
        "fd_stats",
        "reference statistics (mean, covariance of features) of a dataset for evaluate",
        "python main.py fd-stats --data split=train --out runs/mnist-train.npz",
        (
            *EXPERIMENT,
            DATA,
            arg("--num-images", type=int, default=None, help="use the first N images (default: all)"),
            FEATURE_NET,
            arg("--out", type=Path, default=None, help="the .npz to write (default: runs/fd-stats-<time>/...)"),
            overwrite("an existing --out"),
        ),
    ),
    "export": Command(
        "export",
        "write a LatentFlowPipeline directory from any checkpoint, run or export",
        "python main.py export --checkpoint runs/default-20261123-101500/checkpoints/step_00001400 --out my-pipe",
        (
            arg("--checkpoint", type=Path, required=True, help="an export, a run directory or a checkpoint"),
            arg("--out", type=Path, required=True, help="the pipeline directory to write"),
            overwrite("an earlier export at --out"),
        ),
    ),
    "reconstruct": Command(
        "reconstruct",
        "VAE sanity check: PSNR, SSIM and latent statistics on real images",
        "python main.py reconstruct --vae embedded --num-images 500",
        (
            arg(
                "--vae", default="embedded", help="'embedded', a diffusers VAE directory or a Hub id (default embedded)"
            ),
            arg("--subfolder", default=None, help="subfolder of --vae that holds the VAE"),
            arg(
                "--data",
                action="extend",
                nargs="+",
                type=_assignment,
                default=[],
                metavar="KEY=VALUE",
                help="data settings, e.g. --data source=npz path=x.npz (default: bundled MNIST test split)",
            ),
            arg("--num-images", type=int, default=500, help="images to reconstruct (default 500)"),
            arg(
                "--out",
                type=Path,
                default=None,
                help="figure path (default: runs/reconstruct-<timestamp>/reconstruction.png)",
            ),
            overwrite("an existing --out figure"),
        ),
    ),
    "bench": Command(
        "bench",
        "training throughput: the baseline loop against latentflow's",
        "python main.py bench --model DiT-B/2 --latent-size 4 --json runs/bench.json",
        (
            arg("--model", default="DiT-B/2", help="a registered model preset (default DiT-B/2)"),
            arg(
                "--latent-size",
                type=int,
                default=4,
                help="latent side: 4 for 32 px MNIST through an SD VAE, 32 for ImageNet-256",
            ),
            arg(
                "--baseline-batch",
                "--seed-batch",
                dest="baseline_batch",
                type=int,
                default=32,
                help="batch of the baseline loop (default 32)",
            ),
            arg("--batches", default="32,64,128,256", help="batch sizes for the sweep (default 32,64,128,256)"),
            arg("--window-seconds", type=float, default=2.0, help="length of a timed window (default 2)"),
            arg("--windows", type=int, default=3, help="timed windows per configuration (default 3)"),
            arg("--compile", action="store_true", help="also time torch.compile (minutes of compiling on a CPU)"),
            arg("--tiny", action="store_true", help="a seconds-long run on tiny models (for tests)"),
            arg("--json", type=Path, default=None, help="also write the results as JSON"),
            overwrite("an existing --json file"),
            cpu("benchmark"),
        ),
    ),
    "toy": Command(
        "toy",
        "the 2-D toy flow: an MLP velocity field on points, with a GIF of the flow",
        "python main.py toy --data checkerboard --out runs/toy-checkerboard",
        (
            arg(
                "--data",
                choices=("moons", "checkerboard", "8gaussians"),
                default="moons",
                help="2-D data (default moons)",
            ),
            arg("--steps", type=int, default=3000, help="training steps (default 3000)"),
            arg("--particles", type=int, default=2000, help="points to carry from noise to data (default 2000)"),
            arg("--frames", type=int, default=40, help="frames of the GIF (default 40)"),
            arg(
                "--solver",
                choices=("euler", "midpoint", "heun", "rk4"),
                default="heun",
                help="ODE solver (default heun)",
            ),
            arg("--ode-steps", type=int, default=40, help="solver steps (default 40)"),
            arg(
                "--objective",
                choices=("cfm", "meanflow"),
                default="cfm",
                help="cfm (velocity) or meanflow (average velocity: also draws the one-jump samples)",
            ),
            arg("--seed", type=int, default=0, help="seed (default 0)"),
            arg("--out", type=Path, default=None, help="output directory (default: runs/toy-<data>-<timestamp>)"),
        ),
    ),
    "train-vae": Command(
        "train_vae",
        "train an AutoencoderKL for an experiment's data (grey or colour), for vae.pretrained",
        "python main.py train-vae --set data.source=folder --set data.path=DIR --set autoencoder.epochs=30",
        (
            *EXPERIMENT,
            arg("--output-dir", type=Path, default=Path("runs"), help="parent of run directories (default: runs)"),
            arg(
                "--resume",
                default=None,
                metavar="latest|DIR",
                help="continue a VAE run: 'latest', a run directory or one of its checkpoints",
            ),
            arg("--out", type=Path, default=None, help="where the AutoencoderKL goes (default: RUN/vae)"),
            arg("--epochs", type=int, default=None, help="shortcut for --set autoencoder.epochs=N"),
            arg("--batch-size", type=int, default=None, help="shortcut for --set autoencoder.batch_size=N"),
            arg("--lr", type=float, default=None, help="shortcut for --set autoencoder.lr=X"),
            arg("--kl-weight", type=float, default=None, help="shortcut for --set autoencoder.kl_weight=X"),
            arg("--max-items", type=int, default=None, help="shortcut for --set data.max_items=N"),
            arg("--seed", type=int, default=None, help="shortcut for --set train.seed=N"),
            overwrite("a non-empty --out directory"),
            cpu("train"),
        ),
    ),
    "train-classifier": Command(
        "train_classifier",
        "train the classifier net that evaluate uses as its feature space, on an experiment's labelled data",
        "python main.py train-classifier --set data.source=folder --set data.path=DIR",
        (
            *EXPERIMENT,
            arg("--out", type=Path, default=None, help="output directory (default: runs/<name>-classifier-<time>)"),
            arg("--epochs", type=int, default=None, help="epochs (default: 6 for MNIST, else about 300 steps)"),
            arg("--seed", type=int, default=0, help="seed (default 0)"),
            overwrite("a non-empty --out directory"),
        ),
    ),
    "launch": Command(
        "launch",
        "run any command under Accelerate's launcher (several processes, GPUs or machines)",
        "python main.py launch --num_processes 2 -- --config smoke",
        (
            arg(
                "rest",
                nargs=argparse.REMAINDER,
                metavar="[LAUNCH FLAGS] -- [ARGUMENTS]",
                help="accelerate launch flags, then -- and the command's own arguments",
            ),
        ),
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: ...; see --help``) and exit status 2."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments"):  # often a config key given as a flag
            hint = "; experiment settings go through --set, e.g. --set train.epochs=5"
        self.exit(2, f"error: {self.prog}: {printable(message)}{hint}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    invoked = os.path.basename(sys.argv[0])
    parser = _Parser(
        prog=invoked if invoked == "latentflow" else "python main.py",
        description="latentflow: latent flow matching trainer",
        epilog="example:\n  python main.py                       train the embedded default\n"
        "  python main.py sample --help         one command's flags",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=f"example:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for flags, kwargs in command.args:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(module=command.module)
    return parser


# Flag values that parse but cannot be used: (names, test, what it must be).
_FLAG_RULES = [
    (
        (
            "num_samples",
            "steps",
            "num_images",
            "epochs",
            "batch_size",
            "ncol",
            "windows",
            "baseline_batch",
            "max_items",
            "latent_size",
            "particles",
            "frames",
            "ode_steps",
        ),
        lambda v: v >= 1,
        "an integer >= 1",
    ),
    (("trajectory", "seed", "solver_error"), lambda v: v >= 0, "an integer >= 0"),
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


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report_error(message: str) -> None:
    """One line on stderr; under ``main.py launch`` also into the file the launcher reads."""
    path = os.environ.get("LATENTFLOW_ERROR_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')}\t{printable(message)}\n")
        return
    print(f"error: {printable(message)}", file=sys.stderr)


LAUNCH_HELP = """usage: python main.py launch [accelerate launch flags] -- [main.py arguments]

Run latentflow under Accelerate's launcher (several processes or GPUs, several machines),
in this process, so that a worker's error ends the launch in one line with exit status 2.
Launch flags are Accelerate's: --num_processes N, --config_file FILE, --mixed_precision,
--num_machines, --machine_rank, --main_process_ip, --main_process_port, ...

example:
  python main.py launch --num_processes 2 -- --config smoke
  python main.py launch --config_file experiments/accelerate/multi-gpu.yaml -- --set train.epochs=10
"""


def _launch(rest: List[str]) -> int:
    if not rest or rest[0] in ("-h", "--help"):
        print(LAUNCH_HELP)
        return 0
    from .commands.launch import launch, split_argv

    try:
        return launch(*split_argv(rest), run_inline=main)
    except LatentflowError as exc:
        _report_error(str(exc))
        return 2


class _Terminated(Exception):
    """SIGTERM outside a training loop (which takes the signal over to checkpoint first)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _run(args) -> int:
    """Run the parsed command; its errors become one line and an exit status. SIGTERM ends any
    command run directly as Ctrl-C does, with one line: every output is written atomically, so
    what was written is whole and nothing partial stays."""
    import signal
    import threading

    from .distributed import is_launched
    from .training.state import Interrupted

    # not in a launched worker: its launcher's SIGTERM must end it even inside a collective
    own = threading.current_thread() is threading.main_thread() and not is_launched()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if own else None
    try:
        importlib.import_module(f"latentflow.commands.{args.module}").main(args)
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
    except _Terminated:
        if _is_main_rank():
            print("stopped (SIGTERM): completed checkpoints and outputs are intact", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        return _launch(argv[1:])
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    args.argv = argv[1:] if argv and argv[0] in ("train", "train-vae") else argv
    problem = _check_flags(args)
    if problem:
        _report_error(problem)
        return 2
    _quiet_libraries()
    return _run(args)
