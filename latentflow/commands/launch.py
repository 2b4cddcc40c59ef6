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
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import LatentflowError

__all__ = ["launch", "split_argv"]


def _flag(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _flag_value(args: Sequence[str], name: str) -> Optional[str]:
    """The value of ``--name V`` or ``--name=V`` among launcher flags, if given."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def split_argv(rest: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``[launch flags] -- [main.py arguments]`` -> the two lists."""
    rest = list(rest)
    cut = rest.index("--") if "--" in rest else len(rest)
    return rest[:cut], rest[cut + 1 :]


def _first_error(path: str) -> str:
    """The main process's error if it reported one, else the first reported."""
    if not os.path.exists(path):
        return ""
    lines = [line.rstrip("\n").split("\t", 1) for line in open(path) if "\t" in line]
    main = [m for rank, m in lines if rank == "0"]
    return (main or [m for _, m in lines] or [""])[0]


def _is_train(script_args: Sequence[str]) -> bool:
    return not script_args or script_args[0] in ("train",) or script_args[0].startswith("-")


_CHOSEN = ("--multi_gpu", "--use_fsdp", "--use_deepspeed", "--cpu", "--config_file", "--tpu")


def _num_processes(args: List[str]) -> int:
    """``--num_processes`` (added when absent: one per GPU, or one), checked."""
    import torch

    n = _flag_value(args, "--num_processes")
    if n is None:
        n = str(max(1, torch.cuda.device_count()))
        args += ["--num_processes", n]
    if not n.isdigit() or int(n) < 1:
        raise LatentflowError(f"launch --num_processes {n!r}: give a whole number >= 1")
    return int(n)


def _with_defaults(args: List[str]) -> List[str]:
    """Unset choices take latentflow's defaults (precision as a single process picks it),
    which also keeps Accelerate from warning about each."""
    import torch

    from ..distributed import resolve_mixed_precision

    defaults = (
        ("--num_machines", "1"),
        ("--dynamo_backend", "no"),
        ("--mixed_precision", resolve_mixed_precision(None, cpu=not torch.cuda.is_available()) or "no"),
    )
    for flag, value in defaults:
        if not _flag(args, flag) and not _flag(args, "--config_file"):
            args += [flag, value]
    chosen = _flag(args, "--num_cpu_threads_per_process", "--config_file") or "OMP_NUM_THREADS" in os.environ
    if not chosen:
        args += ["--num_cpu_threads_per_process", str(threads_per_process(_num_processes(args)))]
    return args


def threads_per_process(processes: int) -> int:
    """The CPU cores this process may use, shared evenly among ``processes`` workers (at
    least one each): more threads than cores make every process wait on the others."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def launch(launcher_args: Sequence[str], script_args: Sequence[str], run_inline: Callable[[List[str]], int]) -> int:
    """Run ``python -m latentflow SCRIPT_ARGS`` under ``accelerate launch LAUNCHER_ARGS``.

    Several processes on one machine take Accelerate's multi-process launcher, which runs
    gloo without a GPU (its default would start one process on a CPU-only machine). One
    process with nothing else to set up runs here, through ``run_inline`` (signals then reach
    the run itself)."""
    args = list(launcher_args)
    # what a stopped run's resume hint repeats (the workers see it in their environment)
    os.environ["LATENTFLOW_LAUNCH_COMMAND"] = shlex.join(["python", "main.py", "launch", *args, "--"])
    if not _flag(args, *_CHOSEN):
        if _num_processes(args) > 1:
            args.append("--multi_gpu")
        elif not any(
            a.startswith("--") and a.split("=")[0] not in ("--num_processes", "--mixed_precision") for a in args
        ):
            mp = _flag_value(args, "--mixed_precision")
            return run_inline(list(script_args) + (["--mixed-precision", mp] if mp and _is_train(script_args) else []))
    return _run_launcher(_with_defaults(args), script_args)


def _run_launcher(launcher_args: List[str], script_args: Sequence[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([*launcher_args, "-m", "latentflow", *script_args])

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure log
    # `-m latentflow` must import this very package in the workers, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
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
            print(
                f"error: accelerate launch: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                file=sys.stderr,
            )
            return 2
        finally:
            os.environ.pop("LATENTFLOW_ERROR_FILE", None)
    return 0
