"""Run directories and what is in them: how runs are named and created, the checkpoints a
run holds and how they are read, and what a path on the command line points to.

A run lives in one directory, never reused by another run::

    <output-dir>/<name>[+<hash>]-<YYYYmmdd-HHMMSS>/
        .lock                       pid and host of the one process that trains it
        config.yaml                 the resolved experiment config
        log.jsonl                   one JSON record per log interval and per epoch
        figures/                    epoch_001.png ..., final.png, loss.png
        checkpoints/step_00000350/  model.safetensors, ema.safetensors, optimizer.pt,
                                    rng.pt, state.json
        export/                     a LatentFlowPipeline directory (see pipeline.py)

The ``+<hash>`` part is a short hash of the ``--set`` overrides that change what is trained
(listed at the top of ``config.yaml``), so that ``--resume latest`` finds the run that was
started with the same overrides.

A checkpoint directory under its final name is complete (``training.checkpoints`` writes it
atomically). ``state.json`` describes it fully (backbone class and constructor arguments,
classes, latent shape, VAE identity, the training state), so sampling, export and resume
need nothing else. Weights load with safetensors, the optimizer and random states with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .bounded import BoundsError, read_json
from .config import CONTINUABLE_FIELDS
from .errors import CheckpointError
from .files import check_output, file_sha256

__all__ = [
    "CHECKPOINT_FORMAT",
    "Source",
    "checkpoints_of",
    "damaged_part",
    "is_checkpoint_dir",
    "is_export_dir",
    "run_of_checkpoint",
    "usable_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_part",
    "new_run_dir",
    "read_state",
    "resolve_source",
    "naming_overrides",
    "run_base_name",
    "runs_of",
]

CHECKPOINT_FORMAT = 2
STEP_DIR = re.compile(r"^step_(\d{8,})$")
LEGACY_DIR = re.compile(r"^epoch_(\d{4,})$")  # checkpoints of format 1
_STAMP = r"\d{8}-\d{6}(?:-\d+)?"
STATE_KEYS = ("format", "step", "epoch", "train_state", "model", "num_classes", "latent_shape", "vae")
CHECKPOINT_FILES = {
    "model": "model.safetensors",
    "ema": "ema.safetensors",
    "optimizer": "optimizer.pt",
    "rng": "rng.pt",
}


# --- run directories ------------------------------------------------------------------------


FLOW_RUN_IGNORES = (*CONTINUABLE_FIELDS, "autoencoder")  # autoencoder.*: what train-vae trains


def naming_overrides(overrides: Sequence[str] = (), ignore: Sequence[str] = FLOW_RUN_IGNORES) -> List[str]:
    """The ``--set`` overrides that change what is trained, as sorted ``key=value`` strings:
    overrides of ``ignore`` (fields, or whole sections, that a continued run may change) and
    of ``name`` do not count, so that ``--resume latest`` still finds a run extended with more
    epochs."""
    kept = set()
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key != "name" and key not in ignore and key.split(".")[0] not in ignore:
            kept.add(f"{key}={value.strip()}")
    return sorted(kept)


def run_base_name(name: str, overrides: Sequence[str] = (), ignore: Sequence[str] = FLOW_RUN_IGNORES) -> str:
    """``name``, plus ``+`` and a short hash of the overrides that change what is trained
    (``default+3f9a1c2e``); the overrides themselves head the run's ``config.yaml``."""
    tags = naming_overrides(overrides, ignore)
    if not tags:
        return name
    return f"{name}+{hashlib.sha256(chr(10).join(tags).encode()).hexdigest()[:8]}"


def new_run_dir(output_dir: Path, base: str) -> Path:
    """Create ``<output_dir>/<base>-<timestamp>[-k]``, never an existing directory."""
    output_dir = Path(output_dir)
    check_output(output_dir, overwrite=True, flag="--output-dir", directory=True)
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
            raise CheckpointError(
                f"cannot create a run directory in {output_dir} ({exc.strerror}); choose another --output-dir"
            ) from None
    raise CheckpointError(f"could not create a new run directory in {output_dir}")


def runs_of(output_dir: Path, base: str) -> List[Path]:
    """Run directories of exactly this experiment (``smoke`` never matches ``smoke-big``)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(base)}-{_STAMP}$")
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and pattern.match(p.name))


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "export").is_dir())


def is_export_dir(path: Path) -> bool:
    """A pipeline directory (``model_index.json``), or an export of format 1."""
    return (path / "model_index.json").is_file() or _is_legacy_export(path)


def _is_legacy_export(path: Path) -> bool:
    return (path / "export.json").is_file() and (path / "model.safetensors").is_file()


SET_ASIDE_DIR = re.compile(r"^(abandoned|damaged)-\d{8}-\d{6}$")  # checkpoints/abandoned-<time>/step_...


def is_checkpoint_dir(path: Path) -> bool:
    """A step directory of a run: under ``checkpoints/``, or under a set-aside folder there."""
    if not STEP_DIR.match(path.name):
        return False
    return path.parent.name == "checkpoints" or (
        bool(SET_ASIDE_DIR.match(path.parent.name)) and path.parent.parent.name == "checkpoints"
    )


def run_of_checkpoint(path: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent.parent.parent


# --- checkpoints on disk --------------------------------------------------------------------


def checkpoints_of(run_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints_of(run_dir)
    return found[-1][1] if found else None


def usable_checkpoint(run_dir: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest checkpoint of a run that is complete and matches its recorded hashes, and
    the newer ones passed over, each with why (read-only: the caller sets them aside)."""
    root = Path(run_dir) / "checkpoints"
    found = (
        sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))), reverse=True)
        if root.is_dir()
        else []
    )
    skipped = []
    for _, path in found:
        try:
            why = damaged_part(path, read_state(path))
        except CheckpointError as exc:
            why = str(exc).removeprefix(f"checkpoint {path} ").removeprefix(f"{path / 'state.json'} ")
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def has_legacy_checkpoints(run_dir: Path) -> bool:
    return any(LEGACY_DIR.match(p.name) for p in (Path(run_dir) / "checkpoints").glob("epoch_*"))


def read_state(ckpt: Path) -> dict:
    """``state.json`` of a checkpoint, checked for the keys every reader needs."""
    path = Path(ckpt) / "state.json"
    try:
        state = read_json(path, "checkpoint state")
    except BoundsError as exc:
        raise CheckpointError(f"{exc}; use an earlier checkpoint") from None
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
    kinds = {
        "step": int,
        "epoch": int,
        "train_state": dict,
        "model": dict,
        "num_classes": int,
        "latent_shape": list,
        "vae": dict,
    }
    for key, kind in kinds.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(
                f"{path}: {key} is {state[key]!r}, not a {kind.__name__}; the checkpoint is damaged, use an earlier one"
            )
    if not isinstance(state["model"].get("class"), str) or not isinstance(state["model"].get("config"), dict):
        raise CheckpointError(f"{path}: 'model' must record the backbone class and config; the checkpoint is damaged")
    if not isinstance(state["vae"].get("identity"), str):
        raise CheckpointError(f"{path}: 'vae' must record the VAE's identity; the checkpoint is damaged")
    return state


def load_part(path: Path):
    """One checkpoint file: safetensors, or a pickle of plain data (``weights_only``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it fails
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError, EOFError, pickle.UnpicklingError) as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            why = "it holds pickled Python objects, which are not loaded for safety; it was not written by latentflow"
        else:
            why = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else 'unreadable'}"
        raise CheckpointError(f"{path} cannot be loaded ({why}); use an earlier checkpoint") from None


def damaged_part(ckpt: Path, state: dict, parts: Sequence[str] = tuple(CHECKPOINT_FILES)) -> Optional[str]:
    """Why a checkpoint's ``parts`` cannot be trusted, or None: a file missing, or one whose
    bytes no longer match the SHA-256 its ``state.json`` records (checkpoints written before
    hashes were recorded are taken as they are)."""
    recorded = state.get("files")
    for part in parts:
        name = CHECKPOINT_FILES[part]
        if not (Path(ckpt) / name).is_file():
            return f"it is incomplete (no {name})"
        if isinstance(recorded, dict) and recorded.get(name) != file_sha256(Path(ckpt) / name):
            return f"{name} does not match the hash its state.json records (damaged after it was written)"
    return None


def load_checkpoint(
    ckpt: Path,
    parts: Sequence[str] = ("model", "ema", "optimizer", "rng"),
    verify: Sequence[str] = tuple(CHECKPOINT_FILES),
) -> Dict:
    """Load a checkpoint's ``parts`` onto the CPU, after checking them against the hashes in
    its ``state.json`` (callers move them; a device such as Accelerate's ``cpu:0`` is not a
    valid safetensors device). Every file is verified, loaded or not: a damaged checkpoint is
    refused whole."""
    ckpt = Path(ckpt)
    out = {"state": read_state(ckpt)}
    why = damaged_part(ckpt, out["state"], verify)
    if why:
        raise CheckpointError(f"checkpoint {ckpt}: {why}; use an earlier one")
    for part in parts:
        out[part] = load_part(ckpt / CHECKPOINT_FILES[part])
    rng = out.get("rng")
    if "rng" in parts and (not isinstance(rng, dict) or not isinstance(rng.get("ranks"), list)):
        raise CheckpointError(
            f"{ckpt / 'rng.pt'} is not a latentflow random-state file; the checkpoint is damaged, use an earlier one"
        )
    return out


# --- what a path on the command line is -----------------------------------------------------


@dataclass
class Source:
    """A trained model on disk: ``kind`` is 'export' (a pipeline directory), 'checkpoint'
    or 'legacy-export' (format 1); ``run_dir`` is its run, where known."""

    kind: str
    path: Path
    run_dir: Optional[Path]


def resolve_source(path: Path, flag: str = "--checkpoint") -> Source:
    """An export, a run directory (its export, else its newest checkpoint) or a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such directory; pass a run directory, a checkpoint or an export")
    if not path.is_dir():
        raise CheckpointError(f"{flag} {path} is a file; pass a run directory, a checkpoint or an export directory")
    run_above = path.parent if is_run_dir(path.parent) else None
    if (path / "model_index.json").is_file():
        return Source("export", path, run_above)
    if _is_legacy_export(path):
        return Source("legacy-export", path, run_above)
    if is_checkpoint_dir(path):
        read_state(path)
        return Source("checkpoint", path, run_of_checkpoint(path))
    if LEGACY_DIR.match(path.name) or has_legacy_checkpoints(path):
        if not (path / "export").is_dir() and not checkpoints_of(path):
            raise CheckpointError(
                f"{flag} {path}: its checkpoints have format 1 (epoch_NNNN) from an earlier latentflow; "
                "sample from its export/ instead, or train anew"
            )
    if (path / "export").is_dir() and is_export_dir(path / "export"):
        return resolve_source(path / "export", flag)
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return Source("checkpoint", ckpt, path)
    if (path / "config.yaml").is_file():
        raise CheckpointError(f"{flag} {path}: this run has no complete checkpoint or export yet")
    raise CheckpointError(f"{flag} {path} is neither an export, a run directory nor a checkpoint of latentflow")
