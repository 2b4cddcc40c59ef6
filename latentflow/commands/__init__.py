"""The application: one module per command. Each turns parsed flags into a call of the
library, decides where outputs go, and is the only place that tells the user anything.

Every command module has ``main(args)`` (what ``cli.py`` calls with the parsed flags); the
commands with a Python form (``train``, ``generate``, ``evaluate_model``, ``export``,
``reconstruction_check``) take plain arguments and are part of the public API.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..console import Bar, Console

__all__ = ["Terminal", "data_section", "default_output", "device_for", "experiment", "new_output_dir", "say"]


class Terminal(Console):
    """Lines on stdout, and progress bars on stderr where it is a terminal (not in a log file)."""

    def __init__(self):
        self.interactive = sys.stderr.isatty()

    def line(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)  # above a bar, without breaking it
        sys.stdout.flush()

    def bar(self, total: int, initial: int = 0, desc: str = ""):
        if not self.interactive:
            return Bar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False)

    def wrap(self, iterable, desc: str = ""):
        if not self.interactive:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, leave=False)


TERMINAL = Terminal()
say = TERMINAL.line  # one line for the user


def experiment(args):
    """The experiment that ``--config`` (a file or a built-in name; default ``default``) and
    ``--set`` describe."""
    from ..config import load_config

    return load_config(args.config if args.config is not None else "default", args.overrides)


def device_for(cpu: bool):
    import torch

    return torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")


def default_output(source: Path, kind: str, name: str, runs: Path = Path("runs")) -> Path:
    """Where a command writes when not told: ``RUN/<kind>/<name>`` for a run's model, else
    ``runs/<kind>-<timestamp>/<name>``; never the current directory."""
    from ..runs import new_run_dir, resolve_source

    src = resolve_source(Path(source))
    if src.run_dir is not None:
        return src.run_dir / kind / name
    return new_run_dir(runs, kind) / name


def new_output_dir(kind: str, out: Optional[Path]) -> Path:
    """``out``, or a new ``runs/<kind>-<timestamp>/``."""
    from ..runs import new_run_dir

    return Path(out) if out else new_run_dir(Path("runs"), kind)


def data_section(base, assignments):
    """``base`` (a ``DataConfig``) with ``--data key=value`` assignments on top, validated."""
    from dataclasses import asdict

    from ..config import DataConfig, section_from_dict

    data = section_from_dict(DataConfig, {**asdict(base), **dict(assignments)}, "data.")
    data.validate()
    return data
