"""``python main.py launch [accelerate launch flags] -- [main.py arguments]``: Accelerate's
launcher, run in this process so that its failures read like latentflow's own.

``accelerate launch main.py ...`` works as well, but when a worker stops on a user error
(``error: ...``), Accelerate's launcher re-raises torch's ``ChildFailedError`` after it, a
report of some 30 lines, and exits 1. Here the workers hand their one-line error to this
process (``LATENTFLOW_ERROR_FILE``), which prints it once, last, and exits 2; a run stopped
by SIGTERM or Ctrl-C exits 143 or 130, as a single-process run does.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

__all__ = ["launch"]


def _flag(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _first_error(path: str) -> str:
    """The main process's error if it reported one, else the first reported."""
    if not os.path.exists(path):
        return ""
    lines = [line.rstrip("\n").split("\t", 1) for line in open(path) if "\t" in line]
    main = [m for rank, m in lines if rank == "0"]
    return (main or [m for _, m in lines] or [""])[0]


def _is_train(script_args: Sequence[str]) -> bool:
    return not script_args or script_args[0] in ("train",) or script_args[0].startswith("-")


def launch(launcher_args: Sequence[str], script_args: Sequence[str]) -> int:
    """Run ``python -m latentflow SCRIPT_ARGS`` under ``accelerate launch LAUNCHER_ARGS``."""
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher_args: List[str] = list(launcher_args)
    chosen = ("--multi_gpu", "--use_fsdp", "--use_deepspeed", "--cpu", "--config_file", "--tpu")
    if not _flag(launcher_args, *chosen):
        # One machine, several processes: Accelerate's multi-process launcher, which runs
        # gloo without a GPU (its default would start one process on a CPU-only machine).
        n = next((launcher_args[i + 1] for i, a in enumerate(launcher_args[:-1]) if a == "--num_processes"), None)
        n = n or next((a.split("=", 1)[1] for a in launcher_args if a.startswith("--num_processes=")), None)
        if n is None:
            n = str(max(1, torch.cuda.device_count()))
            launcher_args += ["--num_processes", n]
        if not n.isdigit() or int(n) < 1:
            from .errors import LatentflowError

            raise LatentflowError(f"launch --num_processes {n!r}: give a whole number >= 1")
        if int(n) > 1:
            launcher_args.append("--multi_gpu")
        elif not any(a.startswith("--") and a.split("=")[0] not in ("--num_processes", "--mixed_precision")
                     for a in launcher_args):
            # one process and nothing else to set up: run here (signals then reach the run itself)
            from .cli import main

            mp = next((a.split("=", 1)[1] for a in launcher_args if a.startswith("--mixed_precision=")), None)
            mp = mp or next((launcher_args[i + 1] for i, a in enumerate(launcher_args[:-1]) if a == "--mixed_precision"), None)
            return main(list(script_args) + (["--mixed-precision", mp] if mp and _is_train(script_args) else []))
    from .runtime import resolve_mixed_precision

    # Unset choices take latentflow's defaults (precision as a single process picks it),
    # which also keeps Accelerate from warning about each.
    defaults = (("--num_machines", "1"), ("--dynamo_backend", "no"),
                ("--mixed_precision", resolve_mixed_precision(None, cpu=not torch.cuda.is_available()) or "no"))
    for flag, value in defaults:
        if not _flag(launcher_args, flag) and not _flag(launcher_args, "--config_file"):
            launcher_args += [flag, value]
    args = launch_command_parser().parse_args([*launcher_args, "-m", "latentflow", *script_args])

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure log
    # `-m latentflow` must import this very package in the workers, installed or not.
    package_root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="latentflow-launch-") as tmp:
        error_file = os.path.join(tmp, "error")
        os.environ["LATENTFLOW_ERROR_FILE"] = error_file
        try:
            launch_command(args)
        except (ChildFailedError, subprocess.CalledProcessError) as exc:
            if isinstance(exc, ChildFailedError):
                failures = {rank: f.exitcode for rank, f in exc.failures.items()}
            else:  # one process: Accelerate's simple launcher
                failures = {0: exc.returncode}
            message = _first_error(error_file)
            if message:
                print(f"error: {message}", file=sys.stderr)
                return 2
            if all(c in (130, 143) for c in failures.values()):
                return max(failures.values())  # stopped on a signal; the main process said how to continue
            rank = min(failures)
            print(f"error: process {rank} failed with exit code {failures[rank]}; its output is above", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # the launcher itself refused (bad flags, a port in use)
            if type(exc).__name__ == "SignalException":
                return 128 + int(getattr(exc, "sigval", 15))
            print(f"error: accelerate launch: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                  file=sys.stderr)
            return 2
        finally:
            os.environ.pop("LATENTFLOW_ERROR_FILE", None)
    return 0
