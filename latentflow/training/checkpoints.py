"""The checkpoint manager: when a run saves, how a checkpoint is written and rotated, and how
a run is restored from one, with the checks that it is the same run.

Checkpoints and exports always hold full state dicts, gathered with
``torch.distributed.checkpoint``'s helpers, so a run saved under FSDP resumes under DDP or in
one process and the other way round. Reading what is on disk is ``runs.py``'s part.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..config import (
    CONTINUABLE_FIELDS,
    ExperimentConfig,
    config_to_dict,
    read_yaml_mapping,
    recorded_overrides,
    save_config,
)
from ..distributed import on_main
from ..errors import CheckpointError
from ..files import FIX_RUN, atomic_dir, discard, file_sha256, temp_name
from ..rng import get_rng_state, set_rng_state
from ..runs import (
    CHECKPOINT_FILES,
    CHECKPOINT_FORMAT,
    checkpoints_of,
    damaged_part,
    has_legacy_checkpoints,
    is_checkpoint_dir,
    is_export_dir,
    load_checkpoint,
    read_state,
    run_of_checkpoint,
    runs_of,
    usable_checkpoint,
)
from ..vae import explain_load_error
from .optim import all_finite
from .state import TrainState

__all__ = [
    "CheckpointManager",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "resolve_resume",
    "save_checkpoint",
    "Resume",
    "set_aside",
    "set_aside_newer",
]


# --- writing --------------------------------------------------------------------------------


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
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    model, ema = _contiguous(model), _contiguous(ema)
    needed = 3 * sum(t.nbytes for t in model.values()) + sum(t.nbytes for t in ema.values())
    with atomic_dir(final, "checkpoint", needed, intact="earlier checkpoints are intact", fix=FIX_RUN) as tmp:
        save_file(model, str(tmp / "model.safetensors"))
        save_file(ema, str(tmp / "ema.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        hashes = {name: file_sha256(tmp / name) for name in CHECKPOINT_FILES.values()}  # verified on every load
        (tmp / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **state, "files": hashes}, indent=2))
    complete = checkpoints_of(run_dir)
    for _, old in complete[: max(0, len(complete) - keep)]:
        if old != final:  # renamed first: a crash mid-delete leaves a temporary, never half a checkpoint
            doomed = temp_name(old)
            os.replace(old, doomed)
            discard(doomed)  # a symlinked checkpoint loses its link; what it points to is the user's
    return final


def set_aside_newer(run_dir: Path, step: int) -> Optional[Path]:
    """Move the checkpoints after ``step`` (a resume from an older one starts another
    timeline) into ``checkpoints/abandoned-<time>/``; returns that directory, if any."""
    return set_aside(run_dir, [p for s, p in checkpoints_of(run_dir) if s > step], "abandoned")


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


# --- which checkpoint to resume -------------------------------------------------------------


class Resume(NamedTuple):
    """Which checkpoint a resume takes, and the newer ones it passed over (damaged or
    incomplete), each with why."""

    run_dir: Path
    checkpoint: Path
    skipped: List[Tuple[Path, str]] = []


def _newest(run: Path) -> float:
    steps = [p for p in (run / "checkpoints").glob("step_*") if p.is_dir()]
    return max((p.stat().st_mtime for p in steps), default=-1.0)


def resolve_resume(resume: str, output_dir: Path, base: str) -> Optional[Resume]:
    """``--resume latest|RUN_DIR|CHECKPOINT_DIR`` -> the run and the checkpoint to continue,
    or None when ``latest`` finds no run of this experiment with a checkpoint. A run's newest
    checkpoint that is incomplete or fails its hashes is passed over for the one before it."""
    if resume == "latest":
        runs = [r for r in runs_of(output_dir, base) if _newest(r) >= 0]
        if not runs:
            return None
        return _usable(max(runs, key=_newest), f"--resume latest ({base})")
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such directory; pass a run directory, a checkpoint or 'latest'")
    if is_export_dir(path):
        raise CheckpointError(
            f"--resume {resume} is an export (for sampling); pass its run directory or a checkpoint under it"
        )
    if is_checkpoint_dir(path):
        state = read_state(path)
        why = damaged_part(path, state)
        if why:
            raise CheckpointError(f"--resume {resume}: {why}; resume from another checkpoint of the run")
        return Resume(run_of_checkpoint(path), path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(
            f"--resume {resume}: not a run directory (no config.yaml); pass a run directory or a checkpoint"
        )
    if has_legacy_checkpoints(path) and _newest(path) < 0:
        raise CheckpointError(
            f"--resume {resume}: cannot continue this run (its checkpoints have format 1 from an earlier "
            "latentflow); start a new run"
        )
    return _usable(path, f"--resume {resume}")


def _usable(run: Path, asked: str) -> Resume:
    ckpt, skipped = usable_checkpoint(run)
    if ckpt is None:
        why = f" (the newest: {skipped[0][1]})" if skipped else ""
        raise CheckpointError(f"{asked}: cannot continue {run}: it has no complete checkpoint{why}; start a new run")
    return Resume(run, ckpt, skipped)


def set_aside(run_dir: Path, paths: List[Path], kind: str) -> Optional[Path]:
    """Move ``paths`` (checkpoints of the run) into ``checkpoints/<kind>-<time>/``."""
    if not paths:
        return None
    aside = Path(run_dir) / "checkpoints" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, aside / path.name)
    return aside


def recorded_precision(ckpt: Path) -> Optional[str]:
    """The mixed precision a checkpoint was written in (None if unknown)."""
    try:
        return read_state(ckpt).get("mixed_precision")
    except CheckpointError:
        return None


# --- is it the same run? --------------------------------------------------------------------


def check_same_setup(saved: dict, cfg: ExperimentConfig, run_dir: Path) -> List[str]:
    """Refuse a run whose experiment differs in anything but ``CONTINUABLE_FIELDS``; return
    those changes as 'train.epochs: 2 -> 3'. A key an older config lacks is its default."""
    now, default = config_to_dict(cfg), config_to_dict(ExperimentConfig())
    if saved.get("name") != now["name"]:
        raise CheckpointError(f"cannot resume {run_dir}: it is experiment {saved.get('name')!r}, not {now['name']!r}")
    changes = []
    for section, values in now.items():
        if not isinstance(values, dict) or section == "autoencoder":  # what train-vae trains, not this run
            continue
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, default[section][key])
            if old == value:
                continue
            if f"{section}.{key}" in CONTINUABLE_FIELDS:
                changes.append(f"{section}.{key}: {old} -> {value}")
                continue
            raise CheckpointError(
                f"cannot resume {run_dir}: it was trained with {section}.{key}={old!r}, this config says {value!r}; "
                f"use the run's own config ({run_dir / 'config.yaml'}) or start a new run"
            )
    return changes


def check_same_model_and_data(ckpt_dir: Path, ckpt: dict, trainer) -> None:
    """Refuse a checkpoint of another model, VAE, dataset or number of processes."""
    state, facts, cfg = ckpt["state"], trainer.facts, trainer.cfg
    if state["model"]["class"] != facts["model"]["class"] or state["model"]["config"] != facts["model"]["config"]:
        raise CheckpointError(
            f"{ckpt_dir} holds {state['model']['class']} {state['model']['config']}, "
            f"not the {facts['model']['config']} this config builds; start a new run"
        )
    if not trainer.vae.same_weights_as(state["vae"]["identity"]):
        raise CheckpointError(
            f"{ckpt_dir} was trained with VAE {state['vae']['identity']}, but {cfg.vae.pretrained} "
            f"is now {trainer.vae.identity}; restore that VAE or start a new run"
        )
    saved_data, data = state.get("data"), facts["data"]
    if saved_data and (saved_data["fingerprint"], saved_data["rows"]) != (data["fingerprint"], data["rows"]):
        raise CheckpointError(
            f"{ckpt_dir} was trained on other data ({saved_data['rows']} rows, fingerprint "
            f"{saved_data['fingerprint']}; now {data['rows']}, {data['fingerprint']}); "
            "restore the data or start a new run"
        )
    world = trainer.accelerator.num_processes
    saved_world = ckpt["rng"].get("world_size")
    if saved_world != world or len(ckpt["rng"]["ranks"]) != world:
        raise CheckpointError(
            f"{ckpt_dir} was written by {saved_world} process(es); resume it with "
            f"{saved_world} (--num_processes {saved_world}) to continue exactly"
        )


# --- the manager ----------------------------------------------------------------------------

PROBE_LIMIT = 100.0  # a fresh model's CFM loss is about 2 (unit-variance latents and noise)


@torch.no_grad()
def probe_loss(trainer, rows: int = 64) -> float:
    """The CFM loss of the loaded weights on a fixed batch: posterior means of the first
    training rows, noise and times from a local generator (no global random state is
    touched, so a resume stays bit-exact). Every rank computes the same value."""
    from ..flow import cfm_loss

    model, batches = trainer.raw_model, trainer.batches
    idx = batches.rows[: min(rows, len(batches.rows))]
    mean, _, labels = (t.to(trainer.accelerator.device) for t in batches.cache.gather(idx))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(mean.shape, generator=g).to(mean.device)
    t = torch.linspace(0.05, 0.95, len(idx), device=mean.device)
    was_training = model.training
    model.eval()
    try:
        y = None if trainer.cfg.model.unconditional else labels
        return float(cfm_loss(model, x0, trainer.vae.scale(mean), t, trainer.cfg.flow.sigma_min, y=y).mean())
    finally:
        model.train(was_training)


class CheckpointManager:
    """Owns a run's checkpoints: the interval (``train.checkpoint_every`` steps, and every
    epoch end), writing and rotation (the newest ``train.keep_checkpoints`` kept), and
    restoring a run, all of it or nothing."""

    def __init__(self, run_dir: Path, every: int, keep: int):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.last: Optional[Path] = None

    def due(self, step: int, iteration: int, iterations_per_epoch: int) -> bool:
        """A checkpoint inside the epoch (epoch ends always save)."""
        return bool(self.every) and step % self.every == 0 and iteration < iterations_per_epoch

    def save(self, trainer, stats) -> Path:
        """Checkpoint the run. Every rank takes part: RNG states and partial sums are gathered,
        and the full weights under FSDP. Non-finite weights are never saved: the run stops,
        naming the last good checkpoint."""
        from accelerate.utils import gather_object

        acc, st = trainer.accelerator, trainer.state
        if not all_finite(trainer.raw_model):
            raise trainer.diverged(f"the weights became non-finite by optimizer step {st.step} (not saved)")
        stats.fold_into(trainer)
        ranks = gather_object([get_rng_state()]) if acc.num_processes > 1 else [get_rng_state()]
        model_sd, ema_sd = model_state(trainer.raw_model), trainer.ema.state_dict()
        optimizer_sd = optimizer_state(trainer.raw_model, trainer.optimizer)

        def write() -> Tuple[Path, int]:
            log = self.run_dir / "log.jsonl"
            st.log_bytes = log.stat().st_size if log.exists() else 0
            state = {
                "step": st.step,
                "epoch": st.epoch,
                "train_state": st.state_dict(),
                "ema_updates": trainer.ema.updates,
                **trainer.facts,
                "mixed_precision": acc.mixed_precision,
                "time": time.time(),
            }
            optimizer = {"optimizer": optimizer_sd, "scaler": acc.scaler.state_dict() if acc.scaler else None}
            path = save_checkpoint(
                self.run_dir,
                st.step,
                model=model_sd,
                ema=ema_sd,
                optimizer=optimizer,
                rng={"world_size": acc.num_processes, "ranks": ranks},
                state=state,
                keep=self.keep,
            )
            return path, st.log_bytes

        self.last, st.log_bytes = on_main(acc, write)  # every rank keeps the same state
        return self.last

    def restore(self, trainer, ckpt_dir: Path) -> Tuple[TrainState, List[str]]:
        """Load every part of ``ckpt_dir`` into ``trainer`` after checking that it is the same
        run; returns its TrainState and the config changes an extension made. The random
        states are restored last, by ``restore_rng``, so nothing in between draws from them."""
        cfg, acc = trainer.cfg, trainer.accelerator
        changes = check_same_setup(
            on_main(acc, lambda: read_yaml_mapping(self.run_dir / "config.yaml", "run config")), cfg, self.run_dir
        )
        ckpt = load_checkpoint(ckpt_dir)
        check_same_model_and_data(ckpt_dir, ckpt, trainer)
        st = TrainState.from_state_dict(ckpt["state"]["train_state"], ckpt_dir)
        if st.iteration and cfg.train.epochs <= st.epoch:
            raise CheckpointError(
                f"{ckpt_dir} is part way into epoch {st.epoch + 1}; train.epochs must be at least "
                f"{st.epoch + 1} to continue it"
            )

        def restore(part: str, fn) -> None:
            try:
                fn()
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
                raise CheckpointError(
                    f"{ckpt_dir}: cannot restore the {part} ({explain_load_error(exc)}); the checkpoint is damaged or "
                    "belongs to another model: resume from another checkpoint or start a new run"
                ) from None

        restore("model weights", lambda: load_model_state(trainer.raw_model, ckpt["model"]))
        if not all_finite(trainer.raw_model):
            raise CheckpointError(
                f"{ckpt_dir} holds non-finite weights (its run had diverged); resume from an earlier "
                f"checkpoint in {ckpt_dir.parent}"
            )
        loss = probe_loss(trainer)
        if not math.isfinite(loss) or loss > PROBE_LIMIT:
            raise CheckpointError(
                f"{ckpt_dir}: its weights give a loss of {loss:.3g} on a probe batch (a model in training gives "
                f"under {PROBE_LIMIT:g}); the checkpoint is damaged: resume from an earlier one in {ckpt_dir.parent}"
            )
        restore("EMA weights", lambda: trainer.ema.load_state_dict(ckpt["ema"], ckpt["state"]["ema_updates"]))
        restore(
            "optimizer state",
            lambda: load_optimizer_state(trainer.raw_model, trainer.optimizer, ckpt["optimizer"]["optimizer"]),
        )
        if acc.scaler is not None and ckpt["optimizer"].get("scaler"):
            restore("fp16 grad scaler", lambda: acc.scaler.load_state_dict(ckpt["optimizer"]["scaler"]))
        self.last = ckpt_dir
        self._rng = (ckpt["rng"]["ranks"][acc.process_index], restore)
        return st, changes

    def restore_rng(self) -> None:
        """The random states of the checkpoint last restored (call just before the loop)."""
        state, restore = self._rng
        restore("random states", lambda: set_rng_state(state))

    def set_aside_damaged(self, trainer, resume: Resume) -> None:
        """Main process: move the newer checkpoints a resume passed over (incomplete, or failing
        their hashes) into ``checkpoints/damaged-<time>/``, saying so for each."""
        damaged = set_aside(self.run_dir, [path for path, _ in resume.skipped if path.exists()], "damaged")
        for path, why in resume.skipped:
            trainer.console.line(f"{path}: {why}; set aside in {damaged}; resuming from {resume.checkpoint.name}")

    def rewrite_run_files(self, trainer, st: TrainState, changes: List[str], ckpt_dir: Path) -> None:
        """Main process: cut log.jsonl back to the checkpoint, set aside later checkpoints (another
        timeline), record an extension in config.yaml, and log the resume."""
        log = self.run_dir / "log.jsonl"
        if log.exists() and log.stat().st_size > st.log_bytes:  # records written after the checkpoint
            with open(log, "r+b") as f:
                f.truncate(st.log_bytes)
        aside = set_aside_newer(self.run_dir, st.step)
        if aside:
            trainer.console.line(
                f"{self.run_dir}: moved the checkpoints after step {st.step} to {aside} (another timeline)"
            )
        if changes:
            path = self.run_dir / "config.yaml"
            save_config(trainer.cfg, path, recorded_overrides(path))
        trainer.append_log(
            {
                "event": "resume",
                "checkpoint": str(ckpt_dir),
                "step": st.step,
                "epoch": st.epoch,
                "iteration": st.iteration,
                "changes": changes,
                "time": time.time(),
            }
        )
