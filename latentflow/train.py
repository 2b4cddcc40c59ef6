"""``train(cfg, runtime)``: the one training function, in canonical Accelerate order.

    setup            VAE, data, model (from the seed alone), latent cache, EMA, optimizer,
                     ``prepare``, then resume: weights, optimizer, TrainState, RNG
    train_one_epoch  per step: this rank's batch and random stream -> ``accumulate`` /
                     ``backward`` / clip on ``sync_gradients`` / step / EMA; log, checkpoint
                     every ``train.checkpoint_every`` steps, stop cleanly on a signal
    end_of_epoch     epoch summary, grid from fixed noise with the EMA weights, checkpoint
    finish           final grid, curves, the export (a LatentFlowPipeline directory)

Everything that changes as training goes lives in ``TrainState``; its ``state_dict()`` is
what a checkpoint stores beside the weights, so a run killed at any moment and resumed
from a checkpoint continues bit for bit (see README, "Reliability").

Only the main process writes files and prints; every process runs the same collectives in
the same order, and a failure on the main process reaches all of them (``runtime.on_main``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import (
    load_checkpoint,
    new_run_dir,
    resolve_resume,
    run_base_name,
    runs_of,
    save_checkpoint,
)
from .config import EXTENSIBLE_TRAIN_FIELDS, ExperimentConfig, config_to_dict
from .data import build_dataset
from .ema import EMA
from .errors import CheckpointError, LatentflowError, PeerLost, TrainingDiverged
from .figures import class_grid_labels, image_grid, save_grid, save_loss_by_time, save_loss_curve
from .flow import cfm_loss, sample_time
from .latents import LatentBatches, default_cache_dir, load_or_build_cache
from .models import create_model
from .pipeline import pipeline_from_parts, save_pipeline
from .runtime import (
    RankRNG,
    RunLock,
    StopRequest,
    atomic_file,
    faults,
    get_rng_state,
    is_launched,
    is_peer_failure,
    log_image,
    make_accelerator,
    on_main,
    remove_stale_temps,
    set_rng_state,
    start_trackers,
    tracker_for,
    write_text_atomic,
)
from .sampling import sample_images
from .vae import FrozenVAE

__all__ = ["Interrupted", "Runtime", "TrainState", "drop_labels", "learning_rate", "train", "training_loss"]

TIME_BINS = 10  # equal-width bins of t for the loss-by-time statistics
GRID_MAX_CLASSES = 10  # rows of the per-epoch grid


@dataclass
class Runtime:
    """Where and how to run; not part of the experiment."""

    output_dir: Path = Path("runs")
    resume: Optional[str] = None  # 'latest', a run directory or a checkpoint directory
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None: the launcher's, else auto
    cpu: bool = False
    cache_dir: Optional[Path] = None
    dist_timeout: float = 180.0  # seconds a collective may wait for a dead or stalled rank
    overrides: Sequence[str] = ()  # the --set overrides, which name the run
    argv: Optional[Sequence[str]] = None  # the command line, for the resume hint


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainState:
    """Counters and partial sums of a run: with the weights, optimizer and RNG states, all a
    checkpoint needs for the run to continue exactly where it was."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # optimizer-step attempts made in the current epoch (skipped ones too)
    step: int = 0  # optimizer steps taken
    nonfinite_run: int = 0  # consecutive skipped steps
    nonfinite_total: int = 0
    loss_sum: float = 0.0  # this epoch so far, over all ranks (for the epoch mean)
    loss_count: int = 0
    bin_sum: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    bin_count: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    log_bytes: int = 0  # length of log.jsonl when the checkpoint was written

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, values: dict, where: Path) -> "TrainState":
        names = [f for f in cls.__dataclass_fields__]
        missing = [k for k in names if k not in values]
        if missing:
            raise CheckpointError(f"{where}: its train_state lacks {', '.join(missing)}; use an earlier checkpoint")
        return cls(**{k: values[k] for k in names})


# --- the pieces of a step -----------------------------------------------------------------------


def learning_rate(cfg, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant; a pure function of the step."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def drop_labels(labels: torch.Tensor, prob: float, null_label: int, generator: Optional[torch.Generator] = None):
    """Replace each label by ``null_label`` with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_loss(model, x1, labels, flow, class_dropout: float, null_label: int, generator=None):
    """Per-sample CFM loss (B,) and the times t (B,) for one batch of model-space latents:
    noise, times and label dropout from ``generator``. Shared by ``train`` and the benchmark."""
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)  # (B, c, h, w) noise
    t = sample_time(x1.shape[0], flow.time_sampler, device=x1.device, generator=generator,
                    logit_mean=flow.logit_mean, logit_std=flow.logit_std)  # (B,)
    y = drop_labels(labels, class_dropout, null_label, generator)
    return cfm_loss(model, x0, x1, t, flow.sigma_min, y=y), t


def _diverged(run: "Run", what: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"{what}; last good checkpoint: {run.last_checkpoint or 'none'}; "
        "lower train.lr, or use --mixed-precision bf16 instead of fp16"
    )


def _all_finite(model) -> bool:
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


# --- the run: what setup builds and the loop uses ---------------------------------------------


@dataclass
class Run:
    cfg: ExperimentConfig
    rt: Runtime
    accelerator: object
    vae: FrozenVAE
    model: torch.nn.Module  # as prepared (DDP-wrapped when distributed)
    raw_model: torch.nn.Module
    ema: EMA
    optimizer: object
    batches: LatentBatches
    rng: RankRNG
    state: TrainState
    run_dir: Optional[Path]  # on the main process; None elsewhere
    latent_shape: tuple
    num_classes: int
    class_names: Optional[List[str]]
    grid_labels: Optional[List[int]]
    model_meta: dict
    stop: StopRequest
    faults: dict = field(default_factory=dict)
    last_checkpoint: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def _check_same_setup(saved: dict, cfg: ExperimentConfig, run_dir: Path) -> List[str]:
    """Refuse a run whose experiment differs in anything but the fields an extension may
    change; return those changes as 'train.epochs: 2 -> 3'."""
    now = config_to_dict(cfg)
    changes = []
    for section, values in now.items():
        if not isinstance(values, dict):
            if saved.get(section) != values:
                raise CheckpointError(f"cannot resume {run_dir}: it is experiment {saved.get(section)!r}, not {values!r}")
            continue
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key)
            if old == value:
                continue
            if section == "train" and key in EXTENSIBLE_TRAIN_FIELDS:
                changes.append(f"train.{key}: {old} -> {value}")
                continue
            raise CheckpointError(
                f"cannot resume {run_dir}: it was trained with {section}.{key}={old!r}, this config says {value!r}; "
                f"use the run's own config ({run_dir / 'config.yaml'}) or start a new run"
            )
    return changes


def _resume_command(rt: Runtime, run_dir: Path) -> str:
    argv = list(rt.argv or [])
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if not arg.startswith("--resume="):
            cleaned.append(arg)
    prefix = "accelerate launch <your launch flags> main.py" if is_launched() else "python main.py"
    return " ".join([prefix, *map(shlex.quote, cleaned), "--resume", shlex.quote(str(run_dir))])


# --- setup ------------------------------------------------------------------------------------


def setup(cfg: ExperimentConfig, rt: Runtime, accelerator, stop: StopRequest, lock: List[RunLock]) -> Optional[Run]:
    """Build everything, then resume if asked; None when the run to resume is finished.
    The run's lock is appended to ``lock`` as soon as it is taken."""
    from accelerate.utils import set_seed

    is_main, device = accelerator.is_main_process, accelerator.device
    base = run_base_name(cfg.name, rt.overrides)

    # --- where: the run being resumed (locked at once: one writer per run) -----------------
    def claim(run_dir: Path) -> Path:
        lock.append(RunLock(run_dir).acquire())
        if lock[0].previous:
            print(f"{run_dir}: took over the lock of {lock[0].previous}, which is no longer running")
        removed = remove_stale_temps(run_dir, any_owner=True) + remove_stale_temps(run_dir / "checkpoints", any_owner=True)
        if removed:
            print(f"{run_dir}: removed {removed} temporary file(s) left by an earlier crash")
        return run_dir

    def find() -> Optional[tuple]:
        found = resolve_resume(rt.resume, rt.output_dir, base)
        if found is None:
            others = runs_of(rt.output_dir, base)
            why = f" ({len(others)} without a checkpoint)" if others else ""
            print(f"--resume latest: no checkpoint of experiment {base!r} under {rt.output_dir}{why}; starting fresh")
            return None
        claim(found[0])
        return found

    resume = on_main(accelerator, find) if rt.resume else None

    # --- build: VAE, data, the model from the seed alone, the cache ------------------------
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).to(device)
    latent_shape = vae.latent_shape(cfg.data.image_size)  # (c, h, w)
    dataset = build_dataset(cfg.data, channels=vae.in_channels)
    set_seed(cfg.train.seed)  # identical initial weights on every rank, before anything else draws
    try:
        model = create_model(cfg.model.name, sample_size=latent_shape[1], in_channels=latent_shape[0],
                             num_classes=dataset.num_classes)
    except ValueError as exc:
        raise LatentflowError(f"model.name {cfg.model.name}: {exc}") from None
    progress = (lambda it: tqdm(it, desc="encode", leave=False, disable=not sys.stderr.isatty())) if is_main else None
    cache, cache_path = load_or_build_cache(
        vae, dataset, rt.cache_dir or default_cache_dir(), accelerator, cfg.data, cfg.vae, progress,
        stall_s=max(3600.0, rt.dist_timeout),
    )
    model.to(device)
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    model_meta = {"class": type(raw_model).__name__, "config": {k: v for k, v in raw_model.config.items()
                                                                 if not k.startswith("_")}, "preset": cfg.model.name}
    batches = LatentBatches(cache, cfg.train.batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.train.grad_accum, cfg.train.seed)
    grid_classes = min(dataset.num_classes, GRID_MAX_CLASSES)
    run = Run(
        cfg=cfg, rt=rt, accelerator=accelerator, vae=vae, model=model, raw_model=raw_model, ema=ema,
        optimizer=optimizer, batches=batches, rng=RankRNG(cfg.train.seed, accelerator.process_index, device),
        state=TrainState(), run_dir=None, latent_shape=latent_shape, num_classes=dataset.num_classes,
        class_names=getattr(dataset, "class_names", None),
        grid_labels=class_grid_labels(grid_classes, cfg.sampler.grid_per_class), model_meta=model_meta,
        stop=stop, faults=faults(),
    )

    # --- a new run directory, or the resumed one ----------------------------------------------
    run_dir = resume[0] if resume is not None else on_main(accelerator, lambda: claim(new_run_dir(rt.output_dir, base)))
    run.run_dir = run_dir if is_main else None
    if resume is None:
        if is_main:
            (run_dir / "figures").mkdir(exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
            run.log({"event": "start", "experiment": cfg.name, "overrides": list(rt.overrides),
                     "command": " ".join(rt.argv or []), "processes": accelerator.num_processes,
                     "mixed_precision": accelerator.mixed_precision, "cache": str(cache_path), "time": time.time()})
    else:
        if not _resume(run, resume[1]):
            return None
    start_trackers(accelerator, run_dir, config_to_dict(cfg), run.state.step if resume is not None else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    run.say(
        f"run {run_dir}  |  {cfg.model.name} ({n_params / 1e6:.2f} M params) on {len(cache)} latents "
        f"{tuple(latent_shape)}  |  {accelerator.num_processes} process(es) on {device.type}, "
        f"mixed precision {accelerator.mixed_precision}  |  cache {cache_path.name}"
    )
    return run


def _resume(run: Run, ckpt_dir: Path) -> bool:
    """Restore everything from ``ckpt_dir``; False when the run has nothing left to do.
    Failing to restore any part is an error that names it."""
    cfg, acc = run.cfg, run.accelerator
    run_dir = ckpt_dir.parent.parent

    def read_config() -> dict:
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(f"cannot resume {run_dir}: its config.yaml is unreadable ({exc})") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"cannot resume {run_dir}: its config.yaml is not a mapping")
        return saved

    saved_cfg = on_main(acc, read_config)
    changes = _check_same_setup(saved_cfg, cfg, run_dir)
    ckpt = load_checkpoint(ckpt_dir)
    state = ckpt["state"]
    if state["model"]["class"] != run.model_meta["class"] or state["model"]["config"] != run.model_meta["config"]:
        raise CheckpointError(f"{ckpt_dir} holds {state['model']['class']} {state['model']['config']}, "
                              f"not the {run.model_meta['config']} this config builds; start a new run")
    if not run.vae.same_weights_as(state["vae"]["identity"]):
        raise CheckpointError(f"{ckpt_dir} was trained with VAE {state['vae']['identity']}, but {cfg.vae.pretrained} "
                              f"is now {run.vae.identity}; restore that VAE or start a new run")
    saved_world = ckpt["rng"].get("world_size")
    if saved_world != acc.num_processes:
        raise CheckpointError(f"{ckpt_dir} was written by {saved_world} process(es); resume it with "
                              f"{saved_world} (accelerate launch --num_processes {saved_world}) to continue exactly")

    def restore(part: str, fn) -> None:
        try:
            fn()
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{ckpt_dir}: cannot restore the {part} ({str(exc).splitlines()[0][:200]})") from None

    restore("model weights", lambda: run.raw_model.load_state_dict(ckpt["model"]))
    restore("EMA weights", lambda: run.ema.load_state_dict(ckpt["ema"], state["ema_updates"]))
    restore("optimizer state", lambda: run.optimizer.load_state_dict(ckpt["optimizer"]["optimizer"]))
    if acc.scaler is not None:
        restore("fp16 grad scaler", lambda: acc.scaler.load_state_dict(ckpt["optimizer"]["scaler"]))
    restore("random states", lambda: set_rng_state(ckpt["rng"]["ranks"][acc.process_index]))
    run.state = TrainState.from_state_dict(state["train_state"], ckpt_dir)
    run.last_checkpoint = ckpt_dir
    st = run.state

    if st.epoch >= cfg.train.epochs and st.iteration == 0:
        run.say(f"{run_dir} has finished all {st.epoch} epochs; nothing to do. To train it further, "
                f"resume with --set train.epochs=N (N > {st.epoch})")
        return False

    def rewrite_files() -> None:
        log = run_dir / "log.jsonl"
        if log.exists() and log.stat().st_size > st.log_bytes:  # records written after the checkpoint
            with open(log, "r+b") as f:
                f.truncate(st.log_bytes)
        if changes:
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")

    on_main(acc, rewrite_files)
    run.log({"event": "resume", "checkpoint": str(ckpt_dir), "step": st.step, "epoch": st.epoch,
             "iteration": st.iteration, "changes": changes, "time": time.time()})
    where = f"epoch {st.epoch + 1}, step {st.iteration}/{run.batches.iterations_per_epoch} of it" if st.iteration \
        else f"the start of epoch {st.epoch + 1}"
    run.say(f"resuming {run_dir} from {ckpt_dir.name} (optimizer step {st.step}, {where})"
            + (f"; changed {', '.join(changes)}" if changes else ""))
    return True


# --- checkpoints ----------------------------------------------------------------------------


def save(run: Run, stats: "EpochStats") -> Path:
    """Checkpoint the run (every rank takes part: RNG states and partial sums are gathered).
    Non-finite weights are never saved: the run stops, naming the last good checkpoint."""
    from accelerate.utils import gather_object

    acc, st = run.accelerator, run.state
    if not _all_finite(run.raw_model):
        raise _diverged(run, f"the weights became non-finite by optimizer step {st.step} (not saved)")
    stats.fold_into(run)
    ranks = gather_object([get_rng_state()]) if acc.num_processes > 1 else [get_rng_state()]

    def write() -> Path:
        st.log_bytes = (run.run_dir / "log.jsonl").stat().st_size if (run.run_dir / "log.jsonl").exists() else 0
        state = {
            "step": st.step, "epoch": st.epoch, "train_state": st.state_dict(), "ema_updates": run.ema.updates,
            "model": run.model_meta, "num_classes": run.num_classes, "class_names": run.class_names,
            "latent_shape": list(run.latent_shape), "vae": {"name": run.cfg.vae.pretrained, "identity": run.vae.identity},
            "mixed_precision": acc.mixed_precision, "time": time.time(),
        }
        optimizer = {"optimizer": run.optimizer.state_dict(), "scaler": acc.scaler.state_dict() if acc.scaler else None}
        return save_checkpoint(
            run.run_dir, st.step, model=run.raw_model.state_dict(), ema=run.ema.state_dict(), optimizer=optimizer,
            rng={"world_size": acc.num_processes, "ranks": ranks}, state=state, keep=run.cfg.train.keep_checkpoints,
        )

    run.last_checkpoint = on_main(acc, write)
    return run.last_checkpoint


# --- the loop -------------------------------------------------------------------------------


class EpochStats:
    """Device-side sums of one epoch: the loss over good steps and the per-sample loss by
    t bin. On resume the main process starts from the sums the checkpoint recorded."""

    def __init__(self, run: Run):
        st, device = run.state, run.accelerator.device
        own = run.is_main  # the recorded sums are global: count them once
        self.loss_sum = torch.tensor(st.loss_sum if own else 0.0, device=device, dtype=torch.float64)
        self.loss_count = torch.tensor(st.loss_count if own else 0, device=device, dtype=torch.float64)
        self.bin_sum = torch.tensor(st.bin_sum if own else [0.0] * TIME_BINS, device=device, dtype=torch.float64)
        self.bin_count = torch.tensor(st.bin_count if own else [0.0] * TIME_BINS, device=device, dtype=torch.float64)
        self.window = torch.zeros((), device=device)
        self.window_grad = torch.zeros((), device=device)
        self.window_steps = 0
        self.window_start = time.perf_counter()

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, bin_sum: torch.Tensor, bin_count: torch.Tensor):
        self.loss_sum += loss.double()
        self.loss_count += 1
        self.bin_sum += bin_sum.double()
        self.bin_count += bin_count.double()
        self.window += loss
        self.window_grad += grad_norm.float()
        self.window_steps += 1

    def global_sums(self, acc):
        t = torch.cat([self.loss_sum[None], self.loss_count[None], self.bin_sum, self.bin_count])
        return acc.reduce(t, "sum") if acc.num_processes > 1 else t

    def fold_into(self, run: Run) -> None:
        """Record the global sums so far in the TrainState (for a mid-epoch checkpoint)."""
        t = self.global_sums(run.accelerator).tolist()
        st = run.state
        st.loss_sum, st.loss_count = t[0], int(t[1])
        st.bin_sum, st.bin_count = t[2 : 2 + TIME_BINS], t[2 + TIME_BINS :]


def train_step(run: Run, epoch: int, iteration: int):
    """One optimizer step over ``grad_accum`` micro-batches of this rank. Returns the mean
    loss, the gradient norm, the per-bin loss sums and counts, and whether it was skipped."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    device, accum = acc.device, cfg.train.grad_accum
    attempt = epoch * run.batches.iterations_per_epoch + iteration + 1
    inject = attempt in run.faults.get("nonfinite", ())
    losses, bin_sum, bin_count = [], torch.zeros(TIME_BINS, device=device), torch.zeros(TIME_BINS, device=device)
    skipped, grad_norm = False, torch.zeros((), device=device)
    for micro in range(accum):
        gen = run.rng.at(epoch, iteration, micro)
        mean, std, labels = (t.to(device, non_blocking=True) for t in run.batches.batch(epoch, iteration, micro))
        with acc.accumulate(model):
            z = mean + std * torch.randn(std.shape, device=device, generator=gen)  # a fresh posterior sample
            x1 = run.vae.scale(z)  # (B, c, h, w) data end of the path
            per_sample, t = training_loss(model, x1, labels, cfg.flow, cfg.model.class_dropout,
                                          run.raw_model.null_label, gen)
            loss = per_sample.mean()
            if inject:
                loss = loss * float("inf")
            bins = (t * TIME_BINS).long().clamp_(max=TIME_BINS - 1)  # (B,)
            bin_sum.index_add_(0, bins, per_sample.detach().float())
            bin_count.index_add_(0, bins, torch.ones_like(t))
            losses.append(loss.detach())
            acc.backward(loss)
            if acc.sync_gradients:
                clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                grad_norm = acc.clip_grad_norm_(model.parameters(), clip)
                # fp16: the grad scaler skips non-finite steps itself (and must see them to
                # lower its scale); otherwise skip here. One host sync per optimizer step.
                skipped = acc.scaler is None and not bool(torch.isfinite(grad_norm))
                if not skipped:
                    run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
    if acc.scaler is not None and acc.optimizer_step_was_skipped:
        skipped = True
    return torch.stack(losses).mean(), grad_norm, bin_sum, bin_count, skipped


def _stop_agreed(run: Run) -> int:
    """The stop code of any rank that was asked to stop (0: none); every rank gets the same."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return run.stop.code
    import torch.distributed as dist

    code = torch.tensor([run.stop.code], device=acc.device, dtype=torch.int32)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return int(code.item())


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    cfg, acc, st = run.cfg, run.accelerator, run.state
    n = run.batches.iterations_per_epoch
    stats = EpochStats(run)
    run.model.train()
    tty = run.is_main and sys.stderr.isatty()
    bar = tqdm(total=n, initial=st.iteration, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not tty, leave=False)
    for iteration in range(st.iteration, n):
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg.train, st.step)
        loss, grad_norm, bin_sum, bin_count, skipped = train_step(run, epoch, iteration)
        st.iteration = iteration + 1
        if skipped:
            st.nonfinite_run += 1
            st.nonfinite_total += 1
            if st.nonfinite_run >= cfg.train.max_nonfinite:
                raise _diverged(run, f"loss or gradients were non-finite for {st.nonfinite_run} steps in a row "
                                     f"(optimizer step {st.step}, epoch {epoch + 1})")
        else:
            st.nonfinite_run = 0
            st.step += 1
            run.ema.update(run.raw_model)
            stats.add_step(loss, grad_norm, bin_sum, bin_count)
            if st.step in run.faults.get("nan_weights", ()):
                with torch.no_grad():
                    next(run.raw_model.parameters()).fill_(float("nan"))
        bar.update()
        if not skipped and st.step % cfg.train.log_every == 0:
            _log_interval(run, stats, epoch, bar)
        stopping = _stop_agreed(run)
        due = not skipped and cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0
        if stopping or (due and st.iteration < n):  # the epoch end checkpoints anyway
            save(run, stats)
        if stopping:
            bar.close()
            _stopped(run, stopping)
        if not skipped and st.step in run.faults.get("sigkill", ()):
            os.kill(os.getpid(), signal.SIGKILL)
        if not skipped and st.step in run.faults.get("sigterm", ()):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of the next step
    bar.close()
    return stats


def _log_interval(run: Run, stats: EpochStats, epoch: int, bar) -> None:
    """The loss reading every ``log_every`` steps: the only host sync beyond the skip check;
    weights are checked for finiteness here too."""
    acc, st, cfg = run.accelerator, run.state, run.cfg
    if stats.window_steps == 0:
        return
    values = torch.stack([stats.window, stats.window_grad]) / stats.window_steps
    loss, grad = (acc.reduce(values, "mean") if acc.num_processes > 1 else values).tolist()
    if not _all_finite(run.raw_model):
        raise _diverged(run, f"the weights became non-finite by optimizer step {st.step} (epoch {epoch + 1})")
    seconds = time.perf_counter() - stats.window_start
    images_per_s = stats.window_steps * run.batches.global_batch * cfg.train.grad_accum / max(seconds, 1e-9)
    lr = run.optimizer.param_groups[0]["lr"]
    run.log({"event": "step", "epoch": epoch + 1, "step": st.step, "loss": loss, "lr": lr, "grad_norm": grad,
             "images_per_s": images_per_s})
    acc.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad, "train/images_per_s": images_per_s},
            step=st.step)
    if bar.disable:
        run.say(f"step {st.step:6d}  epoch {epoch + 1}/{cfg.train.epochs} ({st.iteration}/{run.batches.iterations_per_epoch})"
                f"  loss {loss:.4f}  grad {grad:.3f}  lr {lr:.2e}  {images_per_s:6.0f} img/s")
    else:
        bar.set_postfix(loss=f"{loss:.4f}")
    stats.window.zero_()
    stats.window_grad.zero_()
    stats.window_steps = 0
    stats.window_start = time.perf_counter()


def _stopped(run: Run, code: int) -> None:
    reason, exit_code = StopRequest.describe(code)
    message = (f"stopped ({reason}) after optimizer step {run.state.step}; checkpoint {run.last_checkpoint}; "
               f"continue with: {_resume_command(run.rt, run.run_dir or Path('RUN'))}")
    raise Interrupted(message, exit_code)


def draw_grid(run: Run, path: Path):
    """The grid of the fixed noise and labels with the EMA weights, saved to ``path``;
    returns it as an (H, W, C) uint8 array."""
    cfg = run.cfg
    labels = run.grid_labels
    count = len(labels) if labels else cfg.sampler.grid_per_class * 8
    result = sample_images(
        run.ema.model, run.vae, run.latent_shape, labels, count, solver=cfg.sampler.solver, steps=cfg.sampler.steps,
        cfg_scale=cfg.sampler.cfg_scale, guidance_interval=cfg.sampler.guidance_interval, atol=cfg.sampler.atol,
        rtol=cfg.sampler.rtol, seed=cfg.train.seed, autocast=run.accelerator.autocast,
    )
    ncol = cfg.sampler.grid_per_class if labels else 8
    with atomic_file(path, "figure") as tmp:
        save_grid(result.images, tmp, ncol=ncol, format="png")
    return image_grid(result.images, ncol)


def end_of_epoch(run: Run, epoch: int, stats: EpochStats, seconds: float) -> None:
    acc, st, cfg = run.accelerator, run.state, run.cfg
    t = stats.global_sums(acc).tolist()
    loss_sum, count = t[0], int(t[1])
    bins = [s / max(c, 1) for s, c in zip(t[2 : 2 + TIME_BINS], t[2 + TIME_BINS :])]
    epoch_loss = loss_sum / count if count else None
    steps = run.batches.iterations_per_epoch
    images_per_s = steps * cfg.train.grad_accum * run.batches.global_batch / max(seconds, 1e-9)
    st.epoch, st.iteration = epoch + 1, 0
    st.loss_sum, st.loss_count = 0.0, 0
    st.bin_sum, st.bin_count = [0.0] * TIME_BINS, [0.0] * TIME_BINS

    def write() -> None:
        figure = run.run_dir / "figures" / f"epoch_{epoch + 1:03d}.png"
        grid = draw_grid(run, figure)
        run.log({"event": "epoch", "epoch": epoch + 1, "step": st.step, "loss": epoch_loss, "seconds": seconds,
                 "images_per_s": images_per_s, "good_steps": count // acc.num_processes,
                 "nonfinite_steps": st.nonfinite_total, "loss_by_time": bins})
        scalars = {"epoch/loss": epoch_loss, "epoch/images_per_s": images_per_s, "epoch/nonfinite_steps": st.nonfinite_total}
        acc.log({k: v for k, v in scalars.items() if v is not None}, step=st.step)
        log_image(acc, "grid", grid, st.step)
        loss_text = f"loss {epoch_loss:.4f}" if epoch_loss is not None else f"loss n/a (all {steps} steps skipped: non-finite)"
        run.say(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  {loss_text}  {seconds:6.1f} s  "
                f"{images_per_s:7.0f} img/s  -> {figure.parent.name}/{figure.name}")

    on_main(acc, write)
    save(run, EpochStats(run))  # the next epoch's sums, all zero


def finish(run: Run) -> Path:
    cfg, st = run.cfg, run.state
    if not _all_finite(run.ema.model):
        raise _diverged(run, "the EMA weights are non-finite at the end of training (not exported)")

    def write() -> Path:
        figures = run.run_dir / "figures"
        draw_grid(run, figures / "final.png")
        log_file = run.run_dir / "log.jsonl"
        save_loss_curve(log_file, figures / "loss.png", title=f"{cfg.name}: {cfg.model.name}")
        save_loss_by_time(log_file, figures / "loss_by_time.png", title=f"{cfg.name}: loss by t")
        pipe = pipeline_from_parts(run.ema.model, run.vae, cfg, run.class_names)
        info = {"run": str(run.run_dir), "checkpoint": str(run.last_checkpoint), "step": st.step, "epoch": st.epoch}
        export = save_pipeline(pipe, run.run_dir / "export", cfg, info)
        run.say(f"done: {run.run_dir}  (export: {export}, final grid: {figures / 'final.png'})")
        return export

    return on_main(run.accelerator, write)


# --- the whole ------------------------------------------------------------------------------


def train(cfg: ExperimentConfig, rt: Optional[Runtime] = None) -> Optional[Path]:
    """Train ``cfg`` (a run directory is created under ``rt.output_dir``, or ``rt.resume``
    continued) and return the run directory on the main process."""
    rt = rt or Runtime()
    accelerator = make_accelerator(rt.mixed_precision, rt.cpu, cfg.train.grad_accum, rt.dist_timeout,
                                   log_with=tracker_for(cfg.train.log_with), project_dir=str(rt.output_dir))
    stop = StopRequest().install(watch_parent=is_launched())
    lock: List[RunLock] = []
    run = None
    try:
        run = setup(cfg, rt, accelerator, stop, lock)
        if run is None:
            return None
        for epoch in range(run.state.epoch, cfg.train.epochs):
            start = time.perf_counter()
            stats = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, stats, time.perf_counter() - start)
        finish(run)
        return run.run_dir
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        last = run.last_checkpoint if run is not None else None
        raise PeerLost(
            f"process {accelerator.process_index} lost contact with the others ({str(exc).splitlines()[0][-90:]}): "
            f"one died or stalled for over --dist-timeout {rt.dist_timeout:g} s; the job stops. "
            f"Last checkpoint: {last or 'none'}"
        ) from None
    finally:
        stop.uninstall()
        for held in lock:
            held.release()
        accelerator.end_training()
