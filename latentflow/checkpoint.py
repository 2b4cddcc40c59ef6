"""Run directories, checkpoints and exports.

A run lives in one directory, never reused by another run::

    <output-dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml                 resolved experiment config
        log.jsonl                   loss readings and per-epoch summaries
        figures/                    epoch_001.png ..., final.png, loss.png
        checkpoints/epoch_0003/     model, ema (safetensors), optimizer.pt, state.json
        export/                     EMA weights (safetensors) + config: all sampling needs

A checkpoint is written into a hidden temporary directory and renamed into place once
complete, so an interrupt, a crash or a full disk leaves either the whole new checkpoint or
none, and the previous one untouched. ``latest_checkpoint`` only trusts renamed ones.
Everything loads with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ExperimentConfig, config_from_dict, config_to_dict, save_config
from .errors import LatentflowError

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_export",
    "new_run_dir",
    "resolve_resume",
    "save_checkpoint",
    "save_export",
]

_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")


class CheckpointError(LatentflowError):
    pass


def new_run_dir(output_dir: Path, name: str) -> Path:
    """Create ``<output_dir>/<name>-<timestamp>[-k]``, never an existing directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        run = output_dir / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
    raise CheckpointError(f"could not create a new run directory in {output_dir}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    model_state: Dict[str, torch.Tensor],
    ema_state: Dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``epoch`` atomically, then delete all but the newest ``keep``."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(exist_ok=True)
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = ckpt_root / f".epoch_{epoch:04d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        _write_json(tmp / "state.json", state)
        if final.exists():  # re-saving an epoch (after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); earlier checkpoints are intact"
        ) from None
    complete = sorted(p for p in ckpt_root.iterdir() if _EPOCH_DIR.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _EPOCH_DIR.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(_EPOCH_DIR.match(p.name).group(1)), default=None)


def load_checkpoint(ckpt: Path, device="cpu") -> dict:
    try:
        return {
            "model": load_file(str(ckpt / "model.safetensors"), device=str(device)),
            "ema": load_file(str(ckpt / "ema.safetensors"), device=str(device)),
            "optimizer": torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True),
            "state": json.loads((ckpt / "state.json").read_text()),
        }
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}: {exc})") from None


def resolve_resume(resume: str, output_dir: Path, name: str) -> Optional[Tuple[Path, Path]]:
    """``--resume latest|RUN_DIR|CHECKPOINT_DIR`` -> (run directory, checkpoint), or None
    when ``latest`` finds nothing to resume."""
    if resume == "latest":
        runs = [p for p in output_dir.glob(f"{name}-*") if p.is_dir() and latest_checkpoint(p)] if output_dir.is_dir() else []
        if not runs:
            return None
        run = max(runs, key=lambda p: (latest_checkpoint(p) / "state.json").stat().st_mtime)
        return run, latest_checkpoint(run)
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such directory; pass a run directory, a checkpoint or 'latest'")
    if _EPOCH_DIR.match(path.name) and path.parent.name == "checkpoints":
        if not (path / "state.json").is_file():
            raise CheckpointError(f"--resume {resume}: checkpoint is incomplete (no state.json); use its run directory")
        return path.parent.parent, path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in {path / 'checkpoints'}")
    return path, ckpt


def save_export(run_dir: Path, ema_state: Dict[str, torch.Tensor], cfg: ExperimentConfig, info: dict) -> Path:
    """EMA weights + resolved config + model facts: all that ``sample`` needs."""
    out = run_dir / "export"
    tmp = run_dir / f".export.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "model.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    _write_json(tmp / "export.json", info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_export(path: Path) -> Tuple[Dict[str, torch.Tensor], ExperimentConfig, dict]:
    """Load an export directory, or a run directory (its export, else its newest EMA)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory; pass a run directory or its export/")
    if (path / "export" / "export.json").is_file():
        path = path / "export"
    if (path / "export.json").is_file():
        weights, cfg_file, info = path / "model.safetensors", path / "config.yaml", json.loads((path / "export.json").read_text())
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"--checkpoint {path}: neither an export nor a run with a complete checkpoint")
        weights, cfg_file, info = ckpt / "ema.safetensors", path / "config.yaml", json.loads((ckpt / "state.json").read_text())
    try:
        cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
        return load_file(str(weights)), cfg, info
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot load weights or config ({exc})") from None
