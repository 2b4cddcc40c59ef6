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

Only the main process writes files and prints. Every process runs the same collectives in
the same order: the decisions that guard them (skip a step, stop, checkpoint) come from
values all ranks share, and a failure on the main process reaches all of them
(``runtime.on_main``).
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
from tqdm import tqdm

from .checkpoint import (
    check_output_dir,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    model_state,
    new_run_dir,
    optimizer_state,
    read_state,
    resolve_resume,
    run_base_name,
    runs_of,
    save_checkpoint,
    set_aside_newer,
)
from .config import CONTINUABLE_FIELDS, ExperimentConfig, config_to_dict, read_yaml_mapping
from .data import build_dataset
from .ema import EMA
from .errors import CheckpointError, DiskError, LatentflowError, PeerLost, TrainingDiverged
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
from .vae import FrozenVAE, explain_load_error

__all__ = ["Interrupted", "Runtime", "TrainState", "adamw", "drop_labels", "learning_rate", "train", "training_loss"]

TIME_BINS = 10  # equal-width bins of t for the loss-by-time statistics
GRID_MAX_CLASSES = 10  # rows of the per-epoch grid


@dataclass
class Runtime:
    """Where and how to run; not part of the experiment."""

    output_dir: Path = Path("runs")
    resume: Optional[str] = None  # 'latest', a run directory or a checkpoint directory
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None: a resumed run's, the launcher's, else auto
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
    checkpoint needs for the run to continue exactly where it was. The sums are over all
    ranks; on resume the main process carries them and the others start from zero."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # optimizer-step attempts made in the current epoch (skipped ones too)
    step: int = 0  # optimizer steps taken
    nonfinite_run: int = 0  # consecutive skipped steps
    nonfinite_total: int = 0
    loss_sum: float = 0.0  # this epoch so far (for the epoch mean)
    loss_count: int = 0
    bin_sum: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    bin_count: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    window_loss: float = 0.0  # this log interval so far
    window_grad: float = 0.0
    window_steps: int = 0
    best_val: float = float("inf")  # the lowest validation loss so far (data.val_fraction)
    best_epoch: int = 0
    log_bytes: int = 0  # length of log.jsonl when the checkpoint was written

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, values: dict, where: Path) -> "TrainState":
        default = cls()
        for name in cls.__dataclass_fields__:
            if name not in values:
                raise CheckpointError(f"{where}: its train_state lacks {name}; use an earlier checkpoint")
            want = type(getattr(default, name))
            ok = isinstance(values[name], (int, float) if want is float else want) and not isinstance(values[name], bool)
            if not ok:
                raise CheckpointError(f"{where}: train_state.{name} is {values[name]!r}, not a {want.__name__}; "
                                      "the checkpoint is damaged, use an earlier one")
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


# --- the pieces of a step -------------------------------------------------------------------


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant or a cosine decay to
    ``lr x min_lr_ratio`` at ``total_steps``; a pure function of the step."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
                    logit_mean=flow.logit_mean, logit_std=flow.logit_std, t_max=flow.t_max)  # (B,)
    y = drop_labels(labels, class_dropout, null_label, generator)
    return cfm_loss(model, x0, x1, t, flow.sigma_min, y=y), t


def adamw(params, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, by default with torch's fused kernel: one pass over each parameter instead of
    the default implementation's dozen elementwise ones (6.7 -> 1.4 ms per step for the
    default's 1.3 M parameters on a 2-core EPYC). The two round differently in the last bits,
    so a checkpoint resumes with the implementation it was written with: its param groups
    record it, and loading them restores it."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def _fused_ok(accelerator) -> bool:
    """Whether to use the fused AdamW kernel: on CPU and CUDA tensors, but not on FSDP's
    DTensors, where this project has not verified it (no GPU run yet); those keep torch's
    default."""
    from accelerate.utils import DistributedType

    return accelerator.device.type in ("cpu", "cuda") and accelerator.distributed_type != DistributedType.FSDP


def all_finite(model) -> bool:
    """Whether every weight is finite; every rank gets the same answer (under FSDP each
    holds shards, so the ranks agree by an all-reduce)."""
    params = list(model.parameters())
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    norms = torch._foreach_norm([p.to_local().detach() if sharded else p.detach() for p in params])
    finite = torch.isfinite(torch.stack(norms)).all().to(torch.int32)
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


# --- the run: what setup builds and the loop uses -------------------------------------------


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
    run_dir: Path
    facts: dict  # what the checkpoints record about the model and the data
    grid_labels: Optional[List[int]]
    stop: StopRequest
    faults: dict
    evaluator: Optional[dict] = None  # the main process's feature net and references (train.eval_every)
    state: TrainState = field(default_factory=TrainState)
    last_checkpoint: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def append_log(self, record: dict) -> None:
        """Append to log.jsonl (main process only; inside ``on_main``)."""
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        """Append to log.jsonl; every rank calls it (a failure reaches all)."""
        on_main(self.accelerator, lambda: self.append_log(record))

    def diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"{what}; last good checkpoint: {self.last_checkpoint or 'none'}; "
                                "lower train.lr, or use --mixed-precision bf16 instead of fp16")


def _check_same_setup(saved: dict, cfg: ExperimentConfig, run_dir: Path) -> List[str]:
    """Refuse a run whose experiment differs in anything but ``CONTINUABLE_FIELDS``; return
    those changes as 'train.epochs: 2 -> 3'. A key an older config lacks is its default."""
    now, default = config_to_dict(cfg), config_to_dict(ExperimentConfig())
    if saved.get("name") != now["name"]:
        raise CheckpointError(f"cannot resume {run_dir}: it is experiment {saved.get('name')!r}, not {now['name']!r}")
    changes = []
    for section, values in now.items():
        if not isinstance(values, dict):
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


def _resume_command(rt: Runtime, run_dir: Path) -> str:
    cleaned, skip = [], False
    for arg in rt.argv or []:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            cleaned.append(arg)
    prefix = "accelerate launch <your launch flags> main.py" if is_launched() else "python main.py"
    return " ".join([prefix, *map(shlex.quote, cleaned), "--resume", shlex.quote(str(run_dir))])


# --- setup ----------------------------------------------------------------------------------


def _claim(run_dir: Path, lock: List[RunLock]) -> Path:
    """Lock ``run_dir`` for this process (main only) and clear an earlier crash's debris."""
    lock.append(RunLock(run_dir).acquire())
    if lock[-1].previous:
        print(f"{run_dir}: took over the lock of {lock[-1].previous}, which is no longer running")
    removed = sum(remove_stale_temps(d, any_owner=True) for d in (run_dir, run_dir / "checkpoints", run_dir / "figures"))
    if removed:
        print(f"{run_dir}: removed {removed} temporary file(s) left by an earlier crash")
    return run_dir


def setup(cfg: ExperimentConfig, rt: Runtime, accelerator, stop: StopRequest, lock: List[RunLock],
          resume: Optional[tuple]) -> Optional[Run]:
    """Build everything, then resume from ``resume`` (run dir, checkpoint) if given; None
    when that run has nothing left to do. The run's lock is appended to ``lock``."""
    from accelerate.utils import set_seed

    is_main, device = accelerator.is_main_process, accelerator.device
    if resume is not None:
        on_main(accelerator, lambda: _claim(resume[0], lock))  # before any work: one writer per run

    # --- build: VAE, data, the model from the seed alone, the cache -----------------------
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).to(device)
    latent_shape = vae.latent_shape(cfg.data.image_size)  # (c, h, w)
    dataset = build_dataset(cfg.data, channels=vae.in_channels)
    set_seed(cfg.train.seed)  # identical initial weights on every rank, before anything else draws
    num_classes = 0 if cfg.model.unconditional else dataset.num_classes
    try:
        model = create_model(cfg.model.name, sample_size=latent_shape[1], in_channels=latent_shape[0],
                             num_classes=num_classes)
    except ValueError as exc:
        raise LatentflowError(f"model.name {cfg.model.name}: {exc}") from None
    progress = (lambda it: tqdm(it, desc="encode", leave=False)) if is_main and sys.stderr.isatty() else None
    cache, cache_root = load_or_build_cache(vae, dataset, rt.cache_dir or default_cache_dir(), accelerator,
                                            cfg.data, cfg.vae, progress, stall_s=max(3600.0, rt.dist_timeout))
    model.to(device)
    ema = EMA(model, cfg.train.ema_decay)
    if cfg.train.grad_checkpointing:
        model.enable_gradient_checkpointing()  # recompute each DiT block in backward
    if cfg.train.compile:
        model.compile()  # in place: parameter names keep no "_orig_mod." prefix
    optimizer = adamw(model.parameters(), cfg.train.lr, cfg.train.weight_decay, fused=_fused_ok(accelerator))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema.track(raw_model)  # under FSDP, each rank averages its own shards
    batches = LatentBatches(cache, cfg.train.batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.train.grad_accum, cfg.train.seed, cfg.data.val_fraction)
    facts = {
        "model": {"class": type(raw_model).__name__, "preset": cfg.model.name,
                  "config": {k: v for k, v in raw_model.config.items() if not k.startswith("_")}},
        "num_classes": num_classes,
        "class_names": (getattr(dataset, "class_names", None) or None) if num_classes else None,
        "latent_shape": list(latent_shape), "vae": {"name": cfg.vae.pretrained, "identity": vae.identity},
        "data": {"fingerprint": dataset.fingerprint(), "rows": len(cache),
                 "iterations_per_epoch": batches.iterations_per_epoch},
    }
    base = run_base_name(cfg.name, rt.overrides)
    run_dir = resume[0] if resume else on_main(accelerator, lambda: _claim(new_run_dir(rt.output_dir, base), lock))
    run = Run(cfg=cfg, rt=rt, accelerator=accelerator, vae=vae, model=model, raw_model=raw_model, ema=ema,
              optimizer=optimizer, batches=batches, rng=RankRNG(cfg.train.seed, accelerator.process_index, device),
              run_dir=run_dir, facts=facts, stop=stop, faults=faults(),
              grid_labels=class_grid_labels(min(num_classes, GRID_MAX_CLASSES), cfg.sampler.grid_per_class))

    if resume is None:
        def start() -> None:
            (run_dir / "figures").mkdir(exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
            run.append_log({"event": "start", "experiment": cfg.name, "overrides": list(rt.overrides),
                            "command": " ".join(rt.argv or []), "processes": accelerator.num_processes,
                            "mixed_precision": accelerator.mixed_precision, "cache": str(cache_root),
                            "time": time.time()})

        on_main(accelerator, start)
    elif not _resume(run, resume[1]):
        return None
    if cfg.train.eval_every:
        run.evaluator = on_main(accelerator, lambda: _evaluator(cfg, vae.in_channels, rt.cache_dir))
    start_trackers(accelerator, run_dir, config_to_dict(cfg), run.state.step if resume else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    run.say(
        f"run {run_dir}  |  {cfg.model.name} ({n_params / 1e6:.2f} M params) on {len(cache)} latents "
        f"{tuple(latent_shape)}  |  {accelerator.num_processes} process(es) on {device.type}, "
        f"mixed precision {accelerator.mixed_precision}  |  cache {cache_root.name}"
    )
    return run


def _evaluator(cfg: ExperimentConfig, channels: int, cache_dir: Optional[Path]) -> dict:
    """The feature net and references for ``train.eval_every`` (built once, at the start)."""
    from .evaluate import feature_net, references_for_run

    try:
        net = feature_net("auto", cfg.data, channels, cfg.data.image_size)
    except LatentflowError as exc:
        raise LatentflowError(f"train.eval_every={cfg.train.eval_every}: {exc}; or set train.eval_every=0") from None
    return {"net": net, "references": references_for_run(cfg.data, net, channels, cache_dir=cache_dir)}


def _resume(run: Run, ckpt_dir: Path) -> bool:
    """Restore everything from ``ckpt_dir``; False when the run has nothing left to do.
    Failing to restore any part is an error that names it."""
    cfg, acc = run.cfg, run.accelerator
    run_dir = ckpt_dir.parent.parent

    changes = _check_same_setup(on_main(acc, lambda: read_yaml_mapping(run_dir / "config.yaml", "run config")),
                                cfg, run_dir)
    ckpt = load_checkpoint(ckpt_dir)
    state, facts = ckpt["state"], run.facts
    if state["model"]["class"] != facts["model"]["class"] or state["model"]["config"] != facts["model"]["config"]:
        raise CheckpointError(f"{ckpt_dir} holds {state['model']['class']} {state['model']['config']}, "
                              f"not the {facts['model']['config']} this config builds; start a new run")
    if not run.vae.same_weights_as(state["vae"]["identity"]):
        raise CheckpointError(f"{ckpt_dir} was trained with VAE {state['vae']['identity']}, but {cfg.vae.pretrained} "
                              f"is now {run.vae.identity}; restore that VAE or start a new run")
    saved_data = state.get("data")
    if saved_data and (saved_data["fingerprint"], saved_data["rows"]) != (facts["data"]["fingerprint"], facts["data"]["rows"]):
        raise CheckpointError(f"{ckpt_dir} was trained on other data ({saved_data['rows']} rows, fingerprint "
                              f"{saved_data['fingerprint']}; now {facts['data']['rows']}, {facts['data']['fingerprint']}); "
                              "restore the data or start a new run")
    saved_world = ckpt["rng"].get("world_size")
    if saved_world != acc.num_processes or len(ckpt["rng"]["ranks"]) != acc.num_processes:
        raise CheckpointError(f"{ckpt_dir} was written by {saved_world} process(es); resume it with "
                              f"{saved_world} (--num_processes {saved_world}) to continue exactly")
    st = TrainState.from_state_dict(state["train_state"], ckpt_dir)
    if st.iteration and cfg.train.epochs <= st.epoch:
        raise CheckpointError(f"{ckpt_dir} is part way into epoch {st.epoch + 1}; train.epochs must be at least "
                              f"{st.epoch + 1} to continue it")

    def restore(part: str, fn) -> None:
        try:
            fn()
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"{ckpt_dir}: cannot restore the {part} ({explain_load_error(exc)}); the checkpoint is damaged or "
                "belongs to another model: resume from another checkpoint or start a new run"
            ) from None

    restore("model weights", lambda: load_model_state(run.raw_model, ckpt["model"]))
    if not all_finite(run.raw_model):
        raise CheckpointError(f"{ckpt_dir} holds non-finite weights (its run had diverged); resume from an earlier "
                              f"checkpoint in {ckpt_dir.parent}")
    restore("EMA weights", lambda: run.ema.load_state_dict(ckpt["ema"], state["ema_updates"]))
    restore("optimizer state", lambda: load_optimizer_state(run.raw_model, run.optimizer, ckpt["optimizer"]["optimizer"]))
    if acc.scaler is not None and ckpt["optimizer"].get("scaler"):
        restore("fp16 grad scaler", lambda: acc.scaler.load_state_dict(ckpt["optimizer"]["scaler"]))
    run.state, run.last_checkpoint = st, ckpt_dir

    if st.epoch >= cfg.train.epochs and st.iteration == 0:
        export = run_dir / "export" / "latentflow.json"
        if export.exists() and json.loads(export.read_text()).get("step") == st.step:
            run.say(f"{run_dir} has finished all {st.epoch} epochs; nothing to do. To train it further, "
                    f"resume with --set train.epochs=N (N > {st.epoch})")
            return False
        run.say(f"{run_dir} has finished training; writing its final grid and export")

    def rewrite_files() -> None:
        log = run_dir / "log.jsonl"
        if log.exists() and log.stat().st_size > st.log_bytes:  # records written after the checkpoint
            with open(log, "r+b") as f:
                f.truncate(st.log_bytes)
        aside = set_aside_newer(run_dir, st.step)
        if aside:
            print(f"{run_dir}: moved the checkpoints after step {st.step} to {aside} (another timeline)")
        if changes:
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
        run.append_log({"event": "resume", "checkpoint": str(ckpt_dir), "step": st.step, "epoch": st.epoch,
                        "iteration": st.iteration, "changes": changes, "time": time.time()})

    on_main(acc, rewrite_files)
    where = (f"epoch {st.epoch + 1}, step {st.iteration}/{run.batches.iterations_per_epoch} of it" if st.iteration
             else f"the start of epoch {st.epoch + 1}")
    run.say(f"resuming {run_dir} from {ckpt_dir.name} (optimizer step {st.step}, {where})"
            + (f"; changed {', '.join(changes)}" if changes else ""))
    # last, so that nothing between here and the loop draws from the restored generators
    restore("random states", lambda: set_rng_state(ckpt["rng"]["ranks"][acc.process_index]))
    return True


# --- the loop -------------------------------------------------------------------------------


class EpochStats:
    """Device-side sums of one epoch (the loss over good steps, the per-sample loss by t bin)
    and of the current log interval. A checkpoint records their global values in the
    TrainState; on resume the main process starts from them and the others from zero, so
    the next reduction over ranks gives the uninterrupted run's sums."""

    def __init__(self, run: Run):
        st, device, own = run.state, run.accelerator.device, run.is_main

        def tensor(value, zero):
            return torch.tensor(value if own else zero, device=device, dtype=torch.float64)

        self.loss_sum, self.loss_count = tensor(st.loss_sum, 0.0), tensor(st.loss_count, 0.0)
        self.bin_sum, self.bin_count = tensor(st.bin_sum, [0.0] * TIME_BINS), tensor(st.bin_count, [0.0] * TIME_BINS)
        self.window_loss, self.window_grad = tensor(st.window_loss, 0.0), tensor(st.window_grad, 0.0)
        self.window_steps = st.window_steps  # the same on every rank
        self.window_start, self.window_ran = time.perf_counter(), 0  # for throughput: steps run here
        self.steps_run = 0  # optimizer-step attempts of this process, for throughput

    def add_step(self, result: "StepResult") -> None:
        self.loss_sum += result.loss.double()
        self.loss_count += 1
        self.bin_sum += result.bin_sum.double()
        self.bin_count += result.bin_count.double()
        self.window_loss += result.loss.double()
        self.window_grad += result.grad_norm.double()
        self.window_steps += 1
        self.window_ran += 1

    def global_sums(self, acc) -> List[float]:
        t = torch.cat([self.loss_sum[None], self.loss_count[None], self.bin_sum, self.bin_count,
                       self.window_loss[None], self.window_grad[None]])
        return (acc.reduce(t, "sum") if acc.num_processes > 1 else t).tolist()

    def fold_into(self, run: Run) -> None:
        """Record the global sums so far in the TrainState (every rank calls it)."""
        t, st, n = self.global_sums(run.accelerator), run.state, TIME_BINS
        st.loss_sum, st.loss_count = t[0], int(t[1])
        st.bin_sum, st.bin_count = t[2 : 2 + n], t[2 + n : 2 + 2 * n]
        st.window_loss, st.window_grad, st.window_steps = t[2 + 2 * n], t[3 + 2 * n], self.window_steps


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of this rank's micro-batches
    grad_norm: torch.Tensor
    bin_sum: torch.Tensor  # per-sample loss summed by t bin (TIME_BINS,)
    bin_count: torch.Tensor
    skipped: bool  # non-finite loss or gradients: no optimizer step


def train_step(run: Run, epoch: int, iteration: int) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches of this rank."""
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
            if cfg.model.unconditional:
                labels = torch.full_like(labels, run.raw_model.null_label)  # p(x): every label is "none"
            per_sample, t = training_loss(model, x1, labels, cfg.flow, cfg.model.class_dropout,
                                          run.raw_model.null_label, gen)
            loss = per_sample.mean() * (float("inf") if inject else 1.0)
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
    return StepResult(torch.stack(losses).mean(), grad_norm.detach(), bin_sum, bin_count, skipped)


def _stop_agreed(run: Run) -> int:
    """The stop code of any rank that was asked to stop (0: none); every rank gets the same."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return run.stop.code
    import torch.distributed as dist

    code = torch.tensor([run.stop.code], device=acc.device, dtype=torch.int32)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return int(code.item())


def _fault_hooks(run: Run, moment: str) -> None:
    """Test hooks at exact moments (``runtime.faults``): right after optimizer step N, or
    once its checkpoint (if any) is written."""
    step, hooks = run.state.step, run.faults
    if moment == "step" and step in hooks.get("nan_weights", ()):
        with torch.no_grad():
            next(run.raw_model.parameters()).fill_(float("nan"))
    if moment == "saved" and step in hooks.get("sigkill", ()):
        os.kill(os.getpid(), signal.SIGKILL)
    if moment == "saved" and step in hooks.get("sigterm", ()):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of the next step


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    cfg, st = run.cfg, run.state
    n = run.batches.iterations_per_epoch
    stats = EpochStats(run)
    run.model.train()
    tty = run.is_main and sys.stderr.isatty()
    bar = tqdm(total=n, initial=st.iteration, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not tty, leave=False)
    for iteration in range(st.iteration, n):
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg.train, st.step, cfg.train.epochs * n)
        result = train_step(run, epoch, iteration)
        st.iteration, stats.steps_run = iteration + 1, stats.steps_run + 1
        if result.skipped:
            st.nonfinite_run, st.nonfinite_total = st.nonfinite_run + 1, st.nonfinite_total + 1
            if st.nonfinite_run >= cfg.train.max_nonfinite:
                raise run.diverged(f"loss or gradients were non-finite for {st.nonfinite_run} steps in a row "
                                   f"(optimizer step {st.step}, epoch {epoch + 1})")
        else:
            st.nonfinite_run, st.step = 0, st.step + 1
            run.ema.update(run.raw_model)
            stats.add_step(result)
            _fault_hooks(run, "step")
            if st.step % cfg.train.log_every == 0:
                if not all_finite(run.raw_model):  # cheap, at the log interval only
                    raise run.diverged(f"the weights became non-finite by optimizer step {st.step} (epoch {epoch + 1})")
                _log_interval(run, stats, epoch, bar)
        bar.update()
        stopping = _stop_agreed(run)
        checkpoint_due = (not result.skipped and cfg.train.checkpoint_every
                          and st.step % cfg.train.checkpoint_every == 0 and st.iteration < n)  # epoch ends save anyway
        if stopping or checkpoint_due:
            save(run, stats)
        if stopping:
            bar.close()
            reason, code = StopRequest.describe(stopping)
            raise Interrupted(f"stopped ({reason}) after optimizer step {st.step}; checkpoint {run.last_checkpoint}; "
                              f"continue with: {_resume_command(run.rt, run.run_dir)}", code)
        if not result.skipped:
            _fault_hooks(run, "saved")
    bar.close()
    return stats


def _log_interval(run: Run, stats: EpochStats, epoch: int, bar) -> None:
    """The loss reading every ``log_every`` steps: the only host sync beyond the skip check."""
    acc, st, cfg = run.accelerator, run.state, run.cfg
    values = torch.stack([stats.window_loss, stats.window_grad])
    total = acc.reduce(values, "sum") if acc.num_processes > 1 else values
    loss, grad = (total / (stats.window_steps * acc.num_processes)).tolist()
    seconds = time.perf_counter() - stats.window_start
    images_per_s = stats.window_ran * run.batches.global_batch * cfg.train.grad_accum / max(seconds, 1e-9)
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
    stats.window_loss.zero_()
    stats.window_grad.zero_()
    stats.window_steps, stats.window_ran, stats.window_start = 0, 0, time.perf_counter()


# --- checkpoints, epoch ends and the end ----------------------------------------------------


@torch.no_grad()
def validation_loss(model, batches: LatentBatches, vae: FrozenVAE, flow, seed: int, chunk: int = 256) -> float:
    """Mean CFM loss of ``model`` on the held-out rows at fixed times, noise and posterior
    samples (one stream per chunk of rows, seeded by its position), so that the value depends
    on the weights alone and compares across epochs and runs."""
    from .runtime import STREAM_VALID, derive_seed

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batches.val_rows), chunk):
        rows = batches.val_rows[start : start + chunk]
        mean, std, labels = (t.to(device) for t in batches.cache.gather(rows))
        g = torch.Generator().manual_seed(derive_seed(seed, STREAM_VALID, start))
        eps, x0 = torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
        t = torch.rand(len(rows), generator=g)
        x1 = vae.scale(mean + std * eps.to(device))  # (B, c, h, w)
        per_sample = cfm_loss(model, x0.to(device), x1, t.to(device), flow.sigma_min, y=labels)
        total, count = total + float(per_sample.sum()), count + len(rows)
    return total / max(count, 1)


def save(run: Run, stats: EpochStats) -> Path:
    """Checkpoint the run (every rank takes part: RNG states and partial sums are gathered,
    and the full weights under FSDP). Non-finite weights are never saved: the run stops,
    naming the last good checkpoint."""
    from accelerate.utils import gather_object

    acc, st = run.accelerator, run.state
    if not all_finite(run.raw_model):
        raise run.diverged(f"the weights became non-finite by optimizer step {st.step} (not saved)")
    stats.fold_into(run)
    ranks = gather_object([get_rng_state()]) if acc.num_processes > 1 else [get_rng_state()]
    model_sd, ema_sd = model_state(run.raw_model), run.ema.state_dict()
    optimizer_sd = optimizer_state(run.raw_model, run.optimizer)

    def write() -> Path:
        log = run.run_dir / "log.jsonl"
        st.log_bytes = log.stat().st_size if log.exists() else 0
        state = {"step": st.step, "epoch": st.epoch, "train_state": st.state_dict(), "ema_updates": run.ema.updates,
                 **run.facts, "mixed_precision": acc.mixed_precision, "time": time.time()}
        optimizer = {"optimizer": optimizer_sd, "scaler": acc.scaler.state_dict() if acc.scaler else None}
        path = save_checkpoint(run.run_dir, st.step, model=model_sd, ema=ema_sd, optimizer=optimizer,
                               rng={"world_size": acc.num_processes, "ranks": ranks}, state=state,
                               keep=run.cfg.train.keep_checkpoints)
        return path, st.log_bytes

    run.last_checkpoint, st.log_bytes = on_main(acc, write)  # every rank keeps the same state
    return run.last_checkpoint


def draw_grid(run: Run, path: Path):
    """The grid of the fixed noise and labels with the EMA weights (in fp32, as ``sample``
    draws), saved to ``path``; returns it as an (H, W, C) uint8 array."""
    cfg, labels = run.cfg, run.grid_labels
    count = len(labels) if labels else cfg.sampler.grid_per_class * 8
    result = sample_images(
        run.ema.model, run.vae, run.facts["latent_shape"], labels, count, solver=cfg.sampler.solver,
        steps=cfg.sampler.steps, cfg_scale=cfg.sampler.cfg_scale, guidance_interval=cfg.sampler.guidance_interval,
        atol=cfg.sampler.atol, rtol=cfg.sampler.rtol, seed=cfg.train.seed,
    )
    ncol = cfg.sampler.grid_per_class if labels else 8
    with atomic_file(path, "figure") as tmp:
        save_grid(result.images, tmp, ncol=ncol, format="png")
    return image_grid(result.images, ncol)


def end_of_epoch(run: Run, epoch: int, stats: EpochStats, seconds: float) -> None:
    acc, st, cfg = run.accelerator, run.state, run.cfg
    t = stats.global_sums(acc)
    loss_sum, count = t[0], int(t[1])
    bins = [s / max(c, 1) for s, c in zip(t[2 : 2 + TIME_BINS], t[2 + TIME_BINS : 2 + 2 * TIME_BINS])]
    epoch_loss = loss_sum / count if count else None
    steps = run.batches.iterations_per_epoch
    images_per_s = stats.steps_run * cfg.train.grad_accum * run.batches.global_batch / max(seconds, 1e-9)
    st.epoch, st.iteration = epoch + 1, 0
    st.loss_sum, st.loss_count = 0.0, 0
    st.bin_sum, st.bin_count = [0.0] * TIME_BINS, [0.0] * TIME_BINS
    run.ema.materialize()  # a collective under FSDP: before only the main process draws
    val_loss = None
    if len(run.batches.val_rows):
        if run.cfg.model.unconditional:
            raise LatentflowError("data.val_fraction with model.unconditional is not supported; set one of them off")
        val_loss = validation_loss(run.ema.model, run.batches, run.vae, cfg.flow, cfg.train.seed)
        improved = val_loss < st.best_val
        if improved:
            st.best_val, st.best_epoch = val_loss, epoch + 1

    def write() -> None:
        figure = run.run_dir / "figures" / f"epoch_{epoch + 1:03d}.png"
        grid = draw_grid(run, figure)
        run.append_log({"event": "epoch", "epoch": epoch + 1, "step": st.step, "loss": epoch_loss, "seconds": seconds,
                        "images_per_s": images_per_s, "good_steps": count // acc.num_processes,
                        "nonfinite_steps": st.nonfinite_total, "loss_by_time": bins, "val_loss": val_loss})
        if val_loss is not None and st.best_epoch == epoch + 1:  # the best so far: keep it as best/
            info = {"run": str(run.run_dir), "step": st.step, "epoch": epoch + 1, "val_loss": val_loss}
            save_pipeline(pipeline_from_parts(run.ema.model, run.vae, cfg, run.facts["class_names"]),
                          run.run_dir / "best", cfg, info)
        scalars = {"epoch/loss": epoch_loss, "epoch/images_per_s": images_per_s, "epoch/nonfinite_steps": st.nonfinite_total,
                   "epoch/val_loss": val_loss}
        acc.log({k: v for k, v in scalars.items() if v is not None}, step=st.step)
        log_image(acc, "grid", grid, st.step)
        loss_text = f"loss {epoch_loss:.4f}" if epoch_loss is not None else f"loss n/a (all {steps} steps skipped: non-finite)"
        val_text = "" if val_loss is None else f"  val {val_loss:.4f}{' (best)' if st.best_epoch == epoch + 1 else ''}"
        run.say(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  {loss_text}{val_text}  {seconds:6.1f} s  "
                f"{images_per_s:7.0f} img/s  -> {figure.parent.name}/{figure.name}")
        every = cfg.train.eval_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs):
            evaluate_during_training(run, epoch)

    on_main(acc, write)
    new_epoch = EpochStats(run)  # the next epoch's sums (zero); the log window carries over
    new_epoch.window_loss, new_epoch.window_grad = stats.window_loss, stats.window_grad
    new_epoch.window_steps, new_epoch.window_ran, new_epoch.window_start = (
        stats.window_steps, stats.window_ran, stats.window_start)
    save(run, new_epoch)


def evaluate_during_training(run: Run, epoch: int) -> None:
    """FD and accuracy of ``train.eval_samples`` EMA samples at the run's sampler settings
    (main process only): logged, sent to the tracker, and plotted in figures/eval.png."""
    from .evaluate import evaluate_images, summary_line
    from .figures import save_eval_curve

    cfg, st = run.cfg, run.state
    start = time.perf_counter()
    n, k = cfg.train.eval_samples, run.facts["num_classes"]
    labels = [i % k for i in range(n)] if k else None
    samples = sample_images(
        run.ema.model, run.vae, run.facts["latent_shape"], labels, n, solver=cfg.sampler.solver,
        steps=cfg.sampler.steps, cfg_scale=cfg.sampler.cfg_scale if k else 0.0,
        guidance_interval=cfg.sampler.guidance_interval, atol=cfg.sampler.atol, rtol=cfg.sampler.rtol,
        seed=cfg.train.seed + 1,  # not the grid's noise
    )
    result = evaluate_images(samples.images, samples.labels, run.evaluator["net"], run.evaluator["references"])
    seconds = time.perf_counter() - start
    run.append_log({"event": "eval", "epoch": epoch + 1, "step": st.step, "seconds": seconds, **result})
    scalars = {"eval/accuracy": result.get("accuracy")}
    for name, r in result["references"].items():
        scalars[f"eval/fd_{name}"] = r["fd"]
        scalars[f"eval/ratio_to_floor_{name}"] = r.get("ratio")
    run.accelerator.log({k: v for k, v in scalars.items() if v is not None}, step=st.step)
    save_eval_curve(run.run_dir / "log.jsonl", run.run_dir / "figures" / "eval.png", title=f"{cfg.name}: evaluation")
    run.say(f"  eval ({n} samples, {seconds:.0f} s): {summary_line(result)}")


def finish(run: Run) -> Path:
    cfg, st = run.cfg, run.state
    run.ema.materialize()
    if not all_finite(run.ema.model):
        raise run.diverged("the EMA weights are non-finite at the end of training (not exported)")

    def write() -> Path:
        figures = run.run_dir / "figures"
        draw_grid(run, figures / "final.png")
        log_file = run.run_dir / "log.jsonl"
        save_loss_curve(log_file, figures / "loss.png", title=f"{cfg.name}: {cfg.model.name}")
        save_loss_by_time(log_file, figures / "loss_by_time.png", title=f"{cfg.name}: loss by t")
        pipe = pipeline_from_parts(run.ema.model, run.vae, cfg, run.facts["class_names"])
        info = {"run": str(run.run_dir), "checkpoint": str(run.last_checkpoint), "step": st.step, "epoch": st.epoch}
        export = save_pipeline(pipe, run.run_dir / "export", cfg, info)
        run.say(f"done: {run.run_dir}  (export: {export}, final grid: {figures / 'final.png'})")
        return export

    return on_main(run.accelerator, write)


# --- the whole ------------------------------------------------------------------------------


def _recorded_precision(rt: Runtime, resume: Optional[tuple]) -> Optional[str]:
    """The precision a resumed run was trained in, unless a flag or the launcher chose one."""
    if rt.mixed_precision or resume is None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return rt.mixed_precision
    try:
        return read_state(resume[1]).get("mixed_precision")
    except CheckpointError:
        return None


def train(cfg: ExperimentConfig, rt: Optional[Runtime] = None) -> Optional[Path]:
    """Train ``cfg`` (a run directory is created under ``rt.output_dir``, or ``rt.resume``
    continued) and return the run directory."""
    rt = rt or Runtime()
    stop = StopRequest()
    if is_launched():
        stop.watch_parent()  # also while setting up: a dead launcher ends a long encode
    base = run_base_name(cfg.name, rt.overrides)
    check_output_dir(rt.output_dir)
    # Where, before anything is built: --resume decides the run and its precision.
    resume = resolve_resume(rt.resume, rt.output_dir, base) if rt.resume else None
    if rt.resume == "latest" and resume is None and os.environ.get("RANK", "0") == "0":
        others = runs_of(rt.output_dir, base)
        why = f" ({len(others)} without a checkpoint)" if others else ""
        print(f"--resume latest: no checkpoint of experiment {base!r} under {rt.output_dir}{why}; starting fresh")
    accelerator = make_accelerator(_recorded_precision(rt, resume), rt.cpu, cfg.train.grad_accum, rt.dist_timeout,
                                   log_with=tracker_for(cfg.train.log_with), project_dir=str(rt.output_dir))
    lock: List[RunLock] = []
    run = None
    try:
        run = setup(cfg, rt, accelerator, stop, lock, resume)
        if run is None:
            return None
        stop.install()  # from here a signal stops the loop cleanly, with a checkpoint
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
