"""``python main.py [train]``: train an experiment, or continue a run (``--resume``)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from ..distributed import is_launched
from ..training import Interrupted, RunOptions
from ..training import train as run_training
from . import TERMINAL, experiment

__all__ = ["Runtime", "main", "resume_command", "train"]

Runtime = RunOptions  # the name of earlier releases


def resume_command(options: RunOptions, run_dir: Optional[Path]) -> str:
    """The command that continues ``run_dir``: the one that was run, with ``--resume RUN``."""
    cleaned, skip = [], False
    for arg in options.argv or []:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            cleaned.append(arg)
    prefix = "python main.py"
    if is_launched():  # under `python main.py launch ...`, that command; else Accelerate's own launcher
        prefix = os.environ.get("LATENTFLOW_LAUNCH_COMMAND") or "accelerate launch <your launch flags> main.py"
    return " ".join([prefix, *map(shlex.quote, cleaned), "--resume", shlex.quote(str(run_dir))])


def train(cfg, options: Optional[RunOptions] = None) -> Optional[Path]:
    """Train ``cfg`` (a new run under ``options.output_dir``, default ``runs/``, or
    ``options.resume`` continued), printing progress; returns the run directory. A run
    stopped by a signal raises ``Interrupted`` saying how to continue it."""
    options = options or RunOptions()
    try:
        return run_training(cfg, options, console=TERMINAL)
    except Interrupted as exc:
        raise Interrupted(
            f"{exc}; continue with: {resume_command(options, getattr(exc, 'run_dir', None))}", exc.exit_code
        ) from None


def main(args) -> None:
    options = RunOptions(
        args.output_dir,
        args.resume,
        args.mixed_precision,
        args.cpu,
        args.cache_dir,
        args.dist_timeout,
        tuple(args.overrides),
        tuple(args.argv),
    )
    train(experiment(args), options)
