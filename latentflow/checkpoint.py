"""Run directories, checkpoints, and what a path on the command line points to.

A run lives in one directory, never reused by another run::

    <output-dir>/<name>[+key=value...]-<YYYYmmdd-HHMMSS>/
        .lock                       pid and host of the one process that trains it
        config.yaml                 the resolved experiment config
        log.jsonl                   one JSON record per log interval and per epoch
        figures/                    epoch_001.png ..., final.png, loss.png
        checkpoints/step_00000350/  model.safetensors, ema.safetensors, optimizer.pt,
                                    rng.pt, state.json
        export/                     a LatentFlowPipeline directory (see pipeline.py)

The ``+key=value`` part names the ``--set`` overrides that change what is trained, so that
``--resume latest`` finds the run that was started with the same overrides.

Every checkpoint is written by ``runtime.atomic_dir``: a directory under its final name is
complete. ``state.json`` describes the checkpoint fully (backbone class and constructor
arguments, classes, latent shape, VAE identity, the training state), so sampling, export
and resume need nothing else. Weights load with safetensors, the optimizer and random
states with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONTINUABLE_FIELDS
from .errors import CheckpointError
from .runtime import temp_name, atomic_dir

__all__ = [
    "CHECKPOINT_FORMAT",
    "Source",
    "checkpoints_of",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "check_output_dir",
    "new_run_dir",
    "resolve_resume",
    "resolve_source",
    "run_base_name",
    "runs_of",
    "save_checkpoint",
    "set_aside_newer",
]

CHECKPOINT_FORMAT = 2
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LEGACY_DIR = re.compile(r"^epoch_(\d{4,})$")  # checkpoints of format 1
_STAMP = r"\d{8}-\d{6}(?:-\d+)?"
STATE_KEYS = ("format", "step", "epoch", "train_state", "model", "num_classes", "latent_shape", "vae")


# --- run directories ------------------------------------------------------------------------


def run_base_name(name: str, overrides: Sequence[str] = ()) -> str:
    """``name`` plus the ``--set`` overrides that change what is trained (``+model.name=DiT-S_2``);
    overrides of the fields a continued run may change do not rename it."""
    tags = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "name" or key in CONTINUABLE_FIELDS:
            continue
        tags.append(f"+{key}={re.sub(r'[^A-Za-z0-9._-]', '_', value.strip())}")
    return name + "".join(sorted(tags))


def new_run_dir(output_dir: Path, base: str) -> Path:
    """Create ``<output_dir>/<base>-<timestamp>[-k]``, never an existing directory."""
    check_output_dir(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {output_dir} ({exc.strerror}); choose another --output-dir") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        run = output_dir / (f"{base}-{stamp}" + (f"-{k}" if k else ""))
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
        except OSError as exc:
            raise CheckpointError(f"cannot create a run directory in {output_dir} ({exc.strerror}); "
                                  "choose another --output-dir") from None
    raise CheckpointError(f"could not create a new run directory in {output_dir}")


def check_output_dir(output_dir: Path) -> None:
    """Refuse an --output-dir that is a file (or under one), before any work starts."""
    for p in [Path(output_dir), *Path(output_dir).parents]:
        if p.exists():
            if not p.is_dir():
                raise CheckpointError(f"--output-dir {output_dir}: {p} is a file; choose a directory")
            return


def runs_of(output_dir: Path, base: str) -> List[Path]:
    """Run directories of exactly this experiment (``smoke`` never matches ``smoke-big``)."""
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(base)}-{_STAMP}$")
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and pattern.match(p.name))


# --- checkpoints ----------------------------------------------------------------------------


def checkpoints_of(run_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints_of(run_dir)
    return found[-1][1] if found else None


def _contiguous(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: Dict[str, torch.Tensor],
    ema: Dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete the oldest beyond ``keep``."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    model, ema = _contiguous(model), _contiguous(ema)
    needed = 3 * sum(t.nbytes for t in model.values()) + sum(t.nbytes for t in ema.values())
    with atomic_dir(final, "checkpoint", needed, intact="earlier checkpoints are intact") as tmp:
        save_file(model, str(tmp / "model.safetensors"))
        save_file(ema, str(tmp / "ema.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **state}, indent=2))
    complete = checkpoints_of(run_dir)
    for _, old in complete[: max(0, len(complete) - keep)]:
        if old != final:  # renamed first: a crash mid-delete leaves a temporary, never half a checkpoint
            doomed = temp_name(old)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def set_aside_newer(run_dir: Path, step: int) -> Optional[Path]:
    """Move the checkpoints after ``step`` (a resume from an older one starts another
    timeline) into ``checkpoints/abandoned-<time>/``; returns that directory, if any."""
    newer = [p for s, p in checkpoints_of(run_dir) if s > step]
    if not newer:
        return None
    aside = Path(run_dir) / "checkpoints" / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for path in newer:
        os.replace(path, aside / path.name)
    return aside


def read_state(ckpt: Path) -> dict:
    """``state.json`` of a checkpoint, checked for the keys every reader needs."""
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no state.json); use an earlier one") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); use an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is damaged, use an earlier one")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {ckpt} has format {state.get('format', 1)}, this latentflow reads format {CHECKPOINT_FORMAT}; "
            "it was written by another release"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the checkpoint is damaged, use an earlier one")
    kinds = {"step": int, "epoch": int, "train_state": dict, "model": dict, "num_classes": int, "latent_shape": list,
             "vae": dict}
    for key, kind in kinds.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: {key} is {state[key]!r}, not a {kind.__name__}; the checkpoint is damaged, "
                                  "use an earlier one")
    if not isinstance(state["model"].get("class"), str) or not isinstance(state["model"].get("config"), dict):
        raise CheckpointError(f"{path}: 'model' must record the backbone class and config; the checkpoint is damaged")
    if not isinstance(state["vae"].get("identity"), str):
        raise CheckpointError(f"{path}: 'vae' must record the VAE's identity; the checkpoint is damaged")
    return state


def load_checkpoint(ckpt: Path, parts: Sequence[str] = ("model", "ema", "optimizer", "rng")) -> dict:
    """Load a checkpoint's ``parts`` onto the CPU (callers move them; a device such as
    Accelerate's ``cpu:0`` is not a valid safetensors device)."""
    ckpt = Path(ckpt)
    out = {"state": read_state(ckpt)}
    files = {"model": "model.safetensors", "ema": "ema.safetensors", "optimizer": "optimizer.pt", "rng": "rng.pt"}
    for part in parts:
        path = ckpt / files[part]
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {path.name}); use an earlier one")
        try:
            if path.suffix == ".safetensors":
                out[part] = load_file(str(path))
            else:
                with warnings.catch_warnings():  # a foreign pickle protocol warns before it fails
                    warnings.simplefilter("ignore")
                    out[part] = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError, SafetensorError, EOFError, pickle.UnpicklingError) as exc:
            text = str(exc)
            if "weights_only" in text or "Unsupported global" in text:
                why = "it holds pickled Python objects, which are not loaded for safety; it was not written by latentflow"
            else:
                why = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else 'unreadable'}"
            raise CheckpointError(f"{path} cannot be loaded ({why}); use an earlier checkpoint") from None
    rng = out.get("rng")
    if "rng" in parts and (not isinstance(rng, dict) or not isinstance(rng.get("ranks"), list)):
        raise CheckpointError(f"{ckpt / 'rng.pt'} is not a latentflow random-state file; the checkpoint is damaged, "
                              "use an earlier one")
    return out


# --- full state of a possibly sharded model -------------------------------------------------
#
# torch.distributed.checkpoint's state-dict helpers give one format whether the model is
# plain, DDP-wrapped or sharded by FSDP: the full tensors, keyed by parameter name (no
# "_orig_mod." or wrapper prefixes). Getting them is a collective under FSDP (every rank
# calls; with cpu_offload only rank 0 receives them); setting them takes the full tensors
# on every rank, which each reads from the checkpoint.


def _full(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model) -> Dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_full(cpu_offload=True))


def load_model_state(model, state: Dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # a torch.compile wrapper's prefix
    set_model_state_dict(model, state, options=_full())


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    kinds = [{k: type(v) for k, v in g.items()} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, state, options=_full())
    for group, kind in zip(optimizer.param_groups, kinds):  # betas come back as lists: keep them tuples
        for key, value in group.items():
            if kind.get(key) is tuple and isinstance(value, list):
                group[key] = tuple(value)


# --- what a path on the command line is -----------------------------------------------------


@dataclass
class Source:
    """A trained model on disk: ``kind`` is 'export' (a pipeline directory), 'checkpoint'
    or 'legacy-export' (format 1); ``run_dir`` is its run, where known."""

    kind: str
    path: Path
    run_dir: Optional[Path]


def _is_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _is_legacy_export(path: Path) -> bool:
    return (path / "export.json").is_file() and (path / "model.safetensors").is_file()


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "export").is_dir())


def resolve_source(path: Path, flag: str = "--checkpoint") -> Source:
    """An export, a run directory (its export, else its newest checkpoint) or a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such directory; pass a run directory, a checkpoint or an export")
    if not path.is_dir():
        raise CheckpointError(f"{flag} {path} is a file; pass a run directory, a checkpoint or an export directory")
    if _is_pipeline(path):
        run = path.parent if _is_run(path.parent) else None
        return Source("export", path, run)
    if _is_legacy_export(path):
        return Source("legacy-export", path, path.parent if _is_run(path.parent) else None)
    if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        read_state(path)
        return Source("checkpoint", path, path.parent.parent)
    if _LEGACY_DIR.match(path.name) or any(_LEGACY_DIR.match(p.name) for p in (path / "checkpoints").glob("epoch_*")):
        if not (path / "export").is_dir() and not checkpoints_of(path):
            raise CheckpointError(
                f"{flag} {path}: its checkpoints have format 1 (epoch_NNNN) from an earlier latentflow; "
                "sample from its export/ instead, or train anew"
            )
    if (path / "export").is_dir() and (_is_pipeline(path / "export") or _is_legacy_export(path / "export")):
        return resolve_source(path / "export", flag)
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return Source("checkpoint", ckpt, path)
    if (path / "config.yaml").is_file():
        raise CheckpointError(f"{flag} {path}: this run has no complete checkpoint or export yet")
    raise CheckpointError(f"{flag} {path} is neither an export, a run directory nor a checkpoint of latentflow")


def resolve_resume(resume: str, output_dir: Path, base: str) -> Optional[Tuple[Path, Path]]:
    """``--resume latest|RUN_DIR|CHECKPOINT_DIR`` -> (run directory, checkpoint), or None
    when ``latest`` finds no run of this experiment with a checkpoint."""
    if resume == "latest":
        runs = [r for r in runs_of(output_dir, base) if latest_checkpoint(r) is not None]
        if not runs:
            return None
        run = max(runs, key=lambda r: (latest_checkpoint(r) / "state.json").stat().st_mtime)
        return run, latest_checkpoint(run)
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such directory; pass a run directory, a checkpoint or 'latest'")
    if _is_pipeline(path) or _is_legacy_export(path):
        raise CheckpointError(
            f"--resume {resume} is an export (for sampling); pass its run directory or a checkpoint under it"
        )
    if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        read_state(path)
        return path.parent.parent, path
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"--resume {resume}: not a run directory (no config.yaml); pass a run directory or a checkpoint")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        legacy = any(_LEGACY_DIR.match(p.name) for p in (path / "checkpoints").glob("epoch_*"))
        why = "its checkpoints have format 1 from an earlier latentflow" if legacy else "it has no complete checkpoint"
        raise CheckpointError(f"--resume {resume}: cannot continue this run ({why}); start a new run")
    return path, ckpt
