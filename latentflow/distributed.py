"""Processes and devices: the Accelerator every command uses, the default precision (and a way
past it for one pass, ``float32_forward``), and the few collectives that keep ranks in step
when one of them fails.

Only the main process writes files and prints. ``on_main`` runs a piece of work there and
hands its result, or its one-line error, to every rank, so a full disk or a locked run
fails the whole job at once instead of leaving the other ranks waiting at the next
collective.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Callable, Iterator, Optional, TypeVar

from .errors import DiskError, LatentflowError

__all__ = [
    "computes_in_low_precision",
    "cpu_has_fast_bf16",
    "float32_forward",
    "is_launched",
    "is_peer_failure",
    "make_accelerator",
    "on_main",
    "resolve_mixed_precision",
]

T = TypeVar("T")


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 matmuls take
    a slow fallback path (docs/performance.md has the measurements)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(flag: Optional[str], cpu: bool = False) -> Optional[str]:
    """An explicit flag wins; then ``accelerate launch --mixed_precision`` (None lets
    Accelerate read it); else bf16 where the device runs it natively, fp32 elsewhere."""
    import torch

    if flag:
        return flag
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def _innermost(model):
    """The module under DDP's (``.module``) and torch.compile's (``._orig_mod``) wrappers."""
    import torch.nn as nn

    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def computes_in_low_precision(model, device_type: str) -> bool:
    """Whether ``model(...)`` called here computes under autocast: inside an autocast block, or
    because Accelerate wrapped the module's forward in one for mixed precision (keeping the
    module's own forward as ``_original_forward``)."""
    import torch

    return torch.is_autocast_enabled(device_type) or "_original_forward" in vars(_innermost(model))


@contextlib.contextmanager
def float32_forward(model, device_type: str) -> Iterator[None]:
    """Inside the block ``model(...)`` computes in float32 (its weights' precision): without the
    autocast of an enclosing block, and without the one Accelerate wraps the module's forward
    in, which is set aside for the block and put back after. The wrappers stay, DDP's hooks
    included."""
    import torch

    module = _innermost(model)
    own, mixed = vars(module).get("_original_forward"), vars(module).get("forward")
    if own is not None:
        module.forward = own
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if own is not None:
            module.forward = mixed


def is_launched() -> bool:
    """True in a worker started by ``accelerate launch`` / ``torchrun``."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_rank() -> bool:
    """Rank 0 by the launcher's environment (before an Accelerator exists)."""
    return os.environ.get("RANK", "0") == "0"


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
    import torch
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


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and hand its result to every rank.

    A ``LatentflowError`` raised there is raised on every rank with the same message; an
    ``OSError`` becomes a one-line ``DiskError``; any other exception (a bug) shows its
    traceback on the main process and stops the others too.
    """
    outcome, crash = [None, None], None
    if accelerator.is_main_process:
        try:
            outcome = [fn(), None]
        except LatentflowError as exc:
            outcome = [None, (type(exc), str(exc))]
        except OSError as exc:  # a write outside the atomic helpers: still one line, on every rank
            outcome = [
                None,
                (
                    DiskError,
                    f"{getattr(exc, 'filename', '') or 'a file'}: {exc.strerror or exc}; "
                    "free some space or write elsewhere (--output-dir)",
                ),
            ]
        except Exception as exc:
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
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "Timed out waiting",
            "Connection closed by peer",
            "Connection reset by peer",
            "collective operation timeout",
            "Broken pipe",
        )
    )
