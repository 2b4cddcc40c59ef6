"""How a process runs, apart from what it trains: the Accelerator, mixed precision, each
rank's random streams, atomic writes, clean stops, and the one-writer lock of a run.

**Random streams.** Every random draw of the training loop comes from a generator reseeded
for each (seed, rank, epoch, iteration, micro-batch) with ``derive_seed``: the noise,
the times, the label dropout and the posterior sample of a step are a pure function of
where the step is, on which rank. Ranks draw different noise while they initialise
identical weights (the model is built from ``seed`` alone), and a resumed run draws exactly
what the uninterrupted run drew without storing generator states. The global generators
(torch, CUDA, Python, numpy) are saved and restored as well, for any code that uses them.

**Atomic writes.** ``atomic_dir`` and ``atomic_file`` write into a hidden temporary beside
the target, fsync it, and rename it into place; replacing an existing directory swaps the
two in one ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it, so there is never
a moment with neither the old nor the new one. A failed write (``OSError``, or the
``SafetensorError`` / ``RuntimeError`` that safetensors and ``torch.save`` raise on a full disk)
becomes one ``DiskError`` line naming the path and the space needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError

from .errors import CheckpointError, DiskError, LatentflowError

__all__ = [
    "RankRNG",
    "RunLock",
    "StopRequest",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "cpu_has_fast_bf16",
    "derive_seed",
    "faults",
    "get_rng_state",
    "is_launched",
    "log_image",
    "start_trackers",
    "tracker_for",
    "is_peer_failure",
    "make_accelerator",
    "on_main",
    "remove_stale_temps",
    "resolve_mixed_precision",
    "set_rng_state",
]

T = TypeVar("T")
HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"


# --- devices and precision ------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 matmuls
    take a fallback path: on an AVX2-only EPYC, 0.9 GFLOP/s against 101 for fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(flag: Optional[str], cpu: bool = False) -> Optional[str]:
    """An explicit flag wins; then ``accelerate launch --mixed_precision`` (None lets
    Accelerate read it); else bf16 where the device runs it natively, fp32 elsewhere."""
    if flag:
        return flag
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def is_launched() -> bool:
    """True in a worker started by ``accelerate launch`` / ``torchrun``."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(
    mixed_precision: Optional[str] = None,
    cpu: bool = False,
    grad_accum: int = 1,
    timeout_s: float = 180.0,
    **kwargs,
):
    """The Accelerator every command uses: the precision default above, gloo on CPU-only
    machines, and a collective timeout so that a dead or stalled rank ends the job.

    Without a GPU, Accelerate picks its gloo CPU backend only when told to run on the CPU;
    a multi-process launch would otherwise become N unrelated single-process runs, so the
    launched world size is checked against what Accelerate set up.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        # In one Python process (a notebook, the Python API, tests) each call may want other
        # settings than the last; Accelerate keeps them in process-wide singletons, which
        # its own test suite resets the same way. A launched worker never does this.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision, cpu),
        gradient_accumulation_steps=grad_accum,
        cpu=cpu or (launched > 1 and not torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        **kwargs,
    )
    if accelerator.num_processes != launched:
        raise LatentflowError(
            f"the launcher started {launched} processes but Accelerate set up {accelerator.num_processes}; "
            "check `accelerate config` (distributed type) or pass --cpu"
        )
    return accelerator


# --- trackers -----------------------------------------------------------------------------

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_for(name: str) -> Optional[str]:
    """The Accelerate ``log_with`` value for ``train.log_with``, refusing a missing package."""
    import importlib.util

    if name == "none":
        return None
    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise LatentflowError(
            f"train.log_with is {name!r} but the {package} package is not installed; `pip install {package}`, "
            "or set train.log_with to another tracker or 'none'"
        )
    return name


def start_trackers(accelerator, run_dir: Path, config: dict, resume_step: Optional[int]) -> None:
    """Point the trackers at ``run_dir`` (TensorBoard writes ``run_dir/tensorboard``) and
    start them; on a resume, TensorBoard drops the events logged after the checkpoint."""
    if not accelerator.log_with:
        return
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir)
    flat = {}

    def walk(prefix, values):
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]  # a resume continues the wandb run
    kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir), "id": run_id, "resume": "allow"}}
    if resume_step is not None:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    # TensorBoard writes into logging_dir/<project name>; wandb files the run under a project
    project = "tensorboard" if "tensorboard" in map(str, accelerator.log_with) else "latentflow"
    accelerator.init_trackers(project, flat, kwargs)


def log_image(accelerator, name: str, image, step: int) -> None:
    """An HWC uint8 image to every tracker (main process only, as Accelerate's own log)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({name: [image]}, step=step)


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and hand its result to every rank.

    A ``LatentflowError`` raised there is raised on every rank with the same message, so a
    full disk or a locked run fails the whole job in one line instead of leaving the other
    ranks waiting at the next collective.
    """
    outcome, crash = [None, None], None
    if accelerator.is_main_process:
        try:
            outcome = [fn(), None]
        except LatentflowError as exc:
            outcome = [None, (type(exc), str(exc))]
        except OSError as exc:  # a write outside the atomic helpers: still one line, on every rank
            outcome = [None, (DiskError, f"{getattr(exc, 'filename', '') or 'a file'}: {exc.strerror or exc}; "
                                         "free some space or write elsewhere (--output-dir)")]
        except Exception as exc:  # a bug: the main process shows its traceback, the others stop too
            crash, outcome = exc, [None, (RuntimeError, f"the main process failed ({type(exc).__name__}: {exc})")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if crash is not None:
        raise crash
    if outcome[1] is not None:
        kind, message = outcome[1]
        raise kind(message)
    return outcome[0]


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another process died or stalled (gloo, NCCL)."""
    if type(exc).__name__ == "DistBackendError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Timed out waiting", "Connection closed by peer", "Connection reset by peer",
        "collective operation timeout", "Broken pipe",
    ))


def faults() -> dict:
    """Test hook: ``LATENTFLOW_FAULTS="nonfinite=3,4;nan_weights=9;sigkill=5;sigterm=7;encode_sigkill=2"``
    makes the loss of those optimizer-step attempts non-finite, the weights NaN after
    optimizer step 9, sends the process SIGKILL (SIGTERM) once step 5 (7) is done,
    checkpoint included, or SIGKILLs it after it wrote its 2nd latent-cache shard (all
    1-based). The tests use it to put faults at exact moments."""
    out = {}
    for part in filter(None, os.environ.get("LATENTFLOW_FAULTS", "").split(";")):
        key, _, values = part.partition("=")
        out[key.strip()] = {int(v) for v in values.split(",") if v.strip()}
    return out


# --- random streams -------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (numpy's SeedSequence hash):
    distinct keys give unrelated streams, equal keys the same stream."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# Stream purposes, the second key of derive_seed, so that no two uses share a stream.
STREAM_TRAIN, STREAM_DATA, STREAM_VALID, STREAM_FLIP = 1, 2, 3, 4


class RankRNG:
    """The training-loop generator of one rank, reseeded for each micro-batch."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=device)

    def at(self, epoch: int, iteration: int, micro: int = 0) -> torch.Generator:
        return self.generator.manual_seed(derive_seed(self.seed, STREAM_TRAIN, self.rank, epoch, iteration, micro))


def get_rng_state() -> dict:
    """This process's global generator states, as tensors and numbers that
    ``torch.load(weights_only=True)`` reads back."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- atomic writes --------------------------------------------------------------------------

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


def temp_name(final: Path, kind: str = "tmp") -> Path:
    return final.parent / f".{final.name}.{kind}-{HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are never in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, any_owner: bool = False) -> int:
    """Remove temporaries that crashed or killed writers left in ``directory``; put back a
    directory whose replacement was cut off between its two renames. ``any_owner``: the
    caller is the only writer (it holds the run lock), so every temporary is stale."""
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        m = _TEMP.match(entry.name)
        legacy = entry.name.startswith(".") and entry.name.endswith(".tmp")  # earlier releases' temps
        if not m and not legacy:
            continue
        if m and not any_owner and (m["host"] != HOST or _pid_alive(int(m["pid"]))):
            continue  # another live writer's work in progress
        if legacy and not any_owner:
            continue
        final = directory / m["name"] if m else None
        if m and m["kind"] == "old" and final is not None and not final.exists():
            os.replace(entry, final)  # the new one never arrived: keep the old one
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed += 1
    return removed


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else sorted(path.rglob("*")) + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is replaced with no gap."""
    if tmp.is_dir() and final.exists():
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
            return
        old = temp_name(final, "old")
        os.replace(final, old)  # a crash here leaves `old`, which remove_stale_temps puts back
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# What a failed write raises: OSError, safetensors' SafetensorError, and the RuntimeError of
# torch.save ("PytorchStreamWriter failed writing file", "iostream error"). Other errors in
# the body (a bug) pass through as they are.
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "file write failed", "unexpected pos", "iostream")


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    if isinstance(exc, SafetensorError):
        return "IoError" in text or "Os {" in text or "No space" in text
    return any(s in text for s in _TORCH_WRITE_FAILURES)


def _reason(exc: BaseException, full: bool) -> str:
    text = str(exc).strip()
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return "No space left on device"
    if full and not isinstance(exc, OSError):  # torch.save says "unexpected pos ..." on a full disk
        return f"No space left on device: {type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {text.splitlines()[-1][:160] if text else 'write failed'}"


def _disk_error(what: str, final: Path, exc: BaseException, needed: Optional[int], intact: str) -> DiskError:
    try:
        free_bytes = shutil.disk_usage(final.parent if final.parent.exists() else Path.cwd()).free
        free = f"{_human(free_bytes)} free there"
    except OSError:
        free_bytes, free = None, "free space unknown"
    full = free_bytes is not None and free_bytes < max(needed or 0, 1 << 20)
    need = f"needs about {_human(needed)}, " if needed else ""
    return DiskError(
        f"could not write {what} {final} ({_reason(exc, full)}; {need}{free}); {intact}; "
        "free some space or write elsewhere (--output-dir, --cache-dir)"
    )


@contextlib.contextmanager
def atomic_dir(final: Path, what: str = "directory", needed: Optional[int] = None,
               intact: str = "what was there before is intact") -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``final`` atomically."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
        _fsync_dir(final.parent)
    except _WRITE_ERRORS as exc:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(exc):
            raise
        raise _disk_error(what, final, exc, needed or written, intact) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, what: str = "file", needed: Optional[int] = None,
                intact: str = "what was there before is intact") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except _WRITE_ERRORS as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not _is_write_failure(exc):
            raise
        raise _disk_error(what, final, exc, needed, intact) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


ASSETS = Path(__file__).resolve().parent / "assets"


def check_output(out: Path, overwrite: bool, replace_shipped: bool = False, directory: bool = False) -> None:
    """Refuse to replace an existing file or fill a non-empty directory ``out`` without
    ``overwrite``, and to write into latentflow's shipped assets unless the maintainer
    command asks to (``replace_shipped``)."""
    out = Path(out)
    inside = out.resolve() == ASSETS or ASSETS in out.resolve().parents
    if inside and not replace_shipped:
        raise LatentflowError(
            f"{out} is one of the assets latentflow ships; write elsewhere (the default is under runs/), or regenerate "
            "it with the maintainer command `python experiments/maintainer/regenerate_assets.py`"
        )
    if directory and out.exists() and not out.is_dir():
        raise LatentflowError(f"{out} is a file; give a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LatentflowError(f"{out} already holds files; choose another --out or pass --overwrite")


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    with atomic_file(path, what) as tmp:
        tmp.write_text(text)


# --- clean stops ----------------------------------------------------------------------------


class StopRequest:
    """SIGINT, SIGTERM or SIGHUP ask the training loop to stop after the current optimizer
    step; a second signal exits at once. In a launched worker, a watchdog thread turns the
    death of the launcher (the parent process) into the same request, and exits the process
    if it has not stopped ``grace_s`` later (also when the launcher dies during setup, before
    there is a loop to stop).

    ``code`` orders the reasons (0: none) so that ranks can agree on one with a max-reduce.
    Under torchrun, the launcher forwards SIGTERM and kills its workers 30 s later: the
    current step and its checkpoint have to fit in that."""

    REASONS = {1: ("SIGINT", 130), 2: ("SIGTERM", 143), 3: ("SIGHUP", 129), 4: ("the launcher process is gone", 143)}
    _CODES = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGHUP: 3}

    def __init__(self):
        self.code = 0
        self._previous = {}
        self._watching = False

    @property
    def requested(self) -> bool:
        return self.code != 0

    def _handle(self, signum, frame) -> None:
        if self.code:  # the second one: leave now; checkpoints on disk are complete
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.code = self._CODES[signum]

    def watch_parent(self, grace_s: float = 60.0) -> "StopRequest":
        """Start the watchdog on the launcher (call as early as possible)."""
        if not self._watching:
            self._watching = True
            parent = os.getppid()
            threading.Thread(target=self._watch, args=(parent, grace_s), daemon=True, name="parent-watch").start()
        return self

    def install(self) -> "StopRequest":
        """Take over SIGINT, SIGTERM and SIGHUP (call when there is a loop to stop)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self._CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _watch(self, parent: int, grace_s: float) -> None:
        while self._watching and os.getppid() == parent:
            time.sleep(0.5)
        if not self._watching:
            return
        if not self.code:
            self.code = 4
        time.sleep(grace_s)  # time to finish the step and write a checkpoint
        if self._watching:
            os._exit(128 + signal.SIGTERM)

    def uninstall(self) -> None:
        self._watching = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @staticmethod
    def describe(code: int):
        """(reason, exit status) of a stop code."""
        return StopRequest.REASONS.get(code, ("a stop request", 143))


# --- one writer per run ---------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, which records the holder's pid and host.

    The kernel drops the lock when its process dies, however it dies, so a lock file whose
    lock can be taken belongs to a dead process and is taken over with a message.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: Optional[int] = None
        self.previous = ""

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is being trained by {holder}; wait for it to finish or stop it first"
            ) from None
        self.previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
