"""Setting a run up: the VAE, the data, the model (from the seed alone), the latent cache, the
EMA and the optimizer, ``accelerator.prepare``, the run directory, then a resume from a
checkpoint if one was asked for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import torch

from ..config import ExperimentConfig, config_to_dict, save_config
from ..console import Console
from ..distributed import on_main
from ..ema import EMA
from ..errors import LatentflowError, Stopped
from ..faults import Faults
from ..figures import class_grid_labels
from ..files import remove_stale_temps
from ..latents import LatentBatches, default_cache_dir, load_or_build_cache, vae_and_data
from ..models import create_model
from ..rng import RankRNG
from ..runs import new_run_dir, run_base_name
from ..signals import RunLock
from .checkpoints import CheckpointManager, Resume
from .objective import gaps_open
from .optim import adamw, fused_ok
from .state import RunOptions, Trainer
from .tracking import start_trackers

__all__ = ["GRID_MAX_CLASSES", "setup"]

GRID_MAX_CLASSES = 10  # rows of the per-epoch grid


def _claim(run_dir: Path, lock: List[RunLock], console: Console) -> Path:
    """Lock ``run_dir`` for this process (main only) and clear an earlier crash's debris."""
    lock.append(RunLock(run_dir).acquire())
    if lock[-1].previous:
        console.line(f"{run_dir}: took over the lock of {lock[-1].previous}, which is no longer running")
    removed = sum(
        remove_stale_temps(d, any_owner=True) for d in (run_dir, run_dir / "checkpoints", run_dir / "figures")
    )
    if removed:
        console.line(f"{run_dir}: removed {removed} temporary file(s) left by an earlier crash")
    return run_dir


def _build_model(cfg: ExperimentConfig, latent_shape, num_classes: int):
    try:
        return create_model(
            cfg.model.name,
            sample_size=latent_shape[1],
            in_channels=latent_shape[0],
            num_classes=num_classes,
            two_times=cfg.flow.objective == "meanflow",
            guidance_range=cfg.flow.guidance_range,
        )
    except ValueError as exc:
        raise LatentflowError(f"model.name {cfg.model.name}: {exc}") from None


def _facts(cfg: ExperimentConfig, raw_model, num_classes, dataset, latent_shape, vae, cache, batches) -> dict:
    """What every checkpoint records about the model and the data (state.json)."""
    return {
        "model": {
            "class": type(raw_model).__name__,
            "preset": cfg.model.name,
            "config": {k: v for k, v in raw_model.config.items() if not k.startswith("_")},
        },
        "num_classes": num_classes,
        "class_names": (getattr(dataset, "class_names", None) or None) if num_classes else None,
        "latent_shape": list(latent_shape),
        "vae": {"name": cfg.vae.pretrained, "identity": vae.identity},
        "data": {
            "fingerprint": dataset.fingerprint(),
            "rows": len(cache),
            "iterations_per_epoch": batches.iterations_per_epoch,
        },
    }


def setup(
    cfg: ExperimentConfig,
    options: RunOptions,
    accelerator,
    stop,
    lock: List[RunLock],
    resume: Optional[Resume],
    console: Console,
) -> Optional[Trainer]:
    """Build everything, then resume from ``resume`` (run dir, checkpoint) if given; None
    when that run has nothing left to do. The run's lock is appended to ``lock``."""
    from accelerate.utils import set_seed

    is_main, device = accelerator.is_main_process, accelerator.device
    if resume is not None:
        on_main(accelerator, lambda: _claim(resume[0], lock, console))  # before any work: one writer per run

    _check_the_difference_runs_in_float32(cfg, accelerator)  # before any data is read or encoded
    vae, dataset = vae_and_data(cfg, device, console if is_main else None)
    # before encoding, on the most steps the data could give (files the encoder skips only lower it)
    most = LatentBatches.steps_per_epoch(
        len(dataset), cfg.train.batch_size, accelerator.num_processes, cfg.train.grad_accum
    )
    _check_the_gaps_open(cfg, most, bound=True)
    latent_shape = vae.latent_shape(cfg.data.image_size)  # (c, h, w)
    set_seed(cfg.train.seed)  # identical initial weights on every rank, before anything else draws
    num_classes = 0 if cfg.model.unconditional else dataset.num_classes
    model = _build_model(cfg, latent_shape, num_classes)
    faults = Faults.from_env()
    cache, cache_root = _latents(cfg, options, accelerator, vae, dataset, stop, console, faults)
    _check_every_class_trains(cache, num_classes, getattr(dataset, "class_names", None), dataset.origin)
    model, raw_model, ema, optimizer = _prepare(cfg, model, accelerator)
    batches = LatentBatches(
        cache,
        cfg.train.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.train.grad_accum,
        cfg.train.seed,
        cfg.data.val_fraction,
    )
    _check_the_gaps_open(cfg, batches.iterations_per_epoch)
    facts = _facts(cfg, raw_model, num_classes, dataset, latent_shape, vae, cache, batches)
    base = run_base_name(cfg.name, options.overrides)
    run_dir = (
        resume[0]
        if resume
        else on_main(accelerator, lambda: _claim(new_run_dir(options.output_dir, base), lock, console))
    )
    trainer = Trainer(
        cfg=cfg,
        options=options,
        accelerator=accelerator,
        vae=vae,
        model=model,
        raw_model=raw_model,
        ema=ema,
        optimizer=optimizer,
        batches=batches,
        rng=RankRNG(cfg.train.seed, accelerator.process_index, device),
        run_dir=run_dir,
        facts=facts,
        stop=stop,
        faults=faults,
        console=console,
        checkpoints=CheckpointManager(run_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints),
        grid_labels=class_grid_labels(min(num_classes, GRID_MAX_CLASSES), cfg.sampler.grid_per_class),
    )
    if resume is None:
        on_main(accelerator, lambda: _start_files(trainer, cache_root))
    elif not _resume(trainer, resume):
        return None
    if cfg.train.eval_every:
        trainer.evaluator = on_main(accelerator, lambda: _evaluator(cfg, vae.in_channels, options.cache_dir))
    start_trackers(accelerator, run_dir, config_to_dict(cfg), trainer.state.step if resume else None)
    _announce(trainer, len(cache), latent_shape, vae.in_channels, cache_root)
    return trainer


def _latents(cfg: ExperimentConfig, options: RunOptions, accelerator, vae, dataset, stop, console, faults):
    """The latent cache (built by every process for its shards, or found), and its root."""
    cache, cache_root = load_or_build_cache(
        vae,
        dataset,
        options.cache_dir or default_cache_dir(),
        accelerator,
        cfg.data,
        cfg.vae,
        stall_s=max(3600.0, options.dist_timeout),
        console=console if accelerator.is_main_process else None,
        faults=faults,
        stop=lambda: stop.requested,
    )
    if stop.requested:  # asked to stop while encoding: no run directory for a run that never started
        raise Stopped("stopped after encoding the latent cache")
    return cache, cache_root


def _check_every_class_trains(cache, num_classes: int, names, origin: str) -> None:
    """A class with no training image would still get a grid row and guidance: refuse it."""
    if not num_classes:
        return
    counts = torch.bincount(cache.labels, minlength=num_classes)
    empty = [(names[c] if names else str(c)) for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise LatentflowError(
            f"{origin}: class {', '.join(empty)} has no training image (bad files skipped, or data.max_items); "
            "add images of it, or leave it out with data.class_names"
        )


def _check_the_gaps_open(cfg: ExperimentConfig, steps_per_epoch: int, bound: bool = False) -> None:
    """A MeanFlow run whose plain flow-matching phase covers every step never trains a jump:
    refuse it (the step count depends on the data, so the config alone cannot). With
    ``bound``, ``steps_per_epoch`` is the most the data could give, before encoding."""
    flow, total = cfg.flow, cfg.train.epochs * steps_per_epoch
    if flow.objective == "meanflow" and not gaps_open(flow, total - 1):  # the gaps only ever widen
        raise LatentflowError(
            f"flow.instant_steps={flow.instant_steps} leaves no step with a gap among the "
            f"{'at most ' if bound else ''}{total} steps of this run ({cfg.train.epochs} epochs of "
            f"{steps_per_epoch}), so one-step sampling would be untrained; lower it, or raise train.epochs"
        )


def _check_the_difference_runs_in_float32(cfg: ExperimentConfig, accelerator) -> None:
    """The MeanFlow derivative by a forward difference needs two float32 passes. Under FSDP
    with mixed precision the sharded weights themselves are cast to bf16 for every pass, so
    no pass can be float32: refuse rather than train on a difference of bf16 outputs."""
    from accelerate.utils import DistributedType

    flow, precision = cfg.flow, accelerator.mixed_precision
    difference = flow.objective == "meanflow" and flow.derivative == "difference"
    if difference and accelerator.distributed_type == DistributedType.FSDP and precision != "no":
        raise LatentflowError(
            f"flow.derivative=difference needs float32 passes, which FSDP with mixed precision {precision} "
            "cannot run (it casts the weights); use --set flow.derivative=jvp, or --mixed-precision no"
        )


def _prepare(cfg: ExperimentConfig, model, accelerator):
    """The model on its device with its EMA, gradient checkpointing and compilation, AdamW, and
    both through ``accelerator.prepare``; returns (prepared model, unwrapped model, EMA, optimizer)."""
    model.to(accelerator.device)
    ema = EMA(model, cfg.train.ema_decay)
    if cfg.train.grad_checkpointing:
        model.enable_gradient_checkpointing()  # recompute each DiT block in backward
    if cfg.train.compile:
        model.compile()  # in place: parameter names keep no "_orig_mod." prefix
    optimizer = adamw(model.parameters(), cfg.train.lr, cfg.train.weight_decay, fused=fused_ok(accelerator))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema.track(raw_model)  # under FSDP, each rank averages its own shards
    return model, raw_model, ema, optimizer


def _announce(trainer: Trainer, rows: int, latent_shape, in_channels: int, cache_root: Path) -> None:
    acc, cfg = trainer.accelerator, trainer.cfg
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    trainer.say(
        f"run {trainer.run_dir}  |  {cfg.model.name} ({n_params / 1e6:.2f} M params) on {rows} latents "
        f"{tuple(latent_shape)} of {'colour' if in_channels == 3 else f'{in_channels}-channel'} "
        f"{cfg.data.image_size} px images  |  {acc.num_processes} process(es) on {acc.device.type}"
        f"{f' ({torch.get_num_threads()} thread(s) each)' if acc.device.type == 'cpu' else ''}, "
        f"mixed precision {acc.mixed_precision}  |  cache {cache_root.name}"
    )


def _start_files(trainer: Trainer, cache_root: Path) -> None:
    """A new run's first files: the resolved config and the log's start record."""
    run_dir, options, acc = trainer.run_dir, trainer.options, trainer.accelerator
    (run_dir / "figures").mkdir(exist_ok=True)
    save_config(trainer.cfg, run_dir / "config.yaml", options.overrides)
    trainer.append_log(
        {
            "event": "start",
            "experiment": trainer.cfg.name,
            "overrides": list(options.overrides),
            "command": " ".join(options.argv or []),
            "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "cache": str(cache_root),
            "time": time.time(),
        }
    )


def _evaluator(cfg: ExperimentConfig, channels: int, cache_dir: Optional[Path]) -> dict:
    """The feature net and references for ``train.eval_every`` (built once, at the start)."""
    from ..evaluation import feature_net, references_for_run

    try:
        net = feature_net("auto", cfg.data, channels, cfg.data.image_size)
    except LatentflowError as exc:
        raise LatentflowError(f"train.eval_every={cfg.train.eval_every}: {exc}; or set train.eval_every=0") from None
    return {"net": net, "references": references_for_run(cfg.data, net, channels, cache_dir=cache_dir)}


def _resume(trainer: Trainer, resume: Resume) -> bool:
    """Restore everything from the checkpoint; False when the run has nothing left to do."""
    import json

    cfg, manager, ckpt_dir = trainer.cfg, trainer.checkpoints, resume.checkpoint
    st, changes = manager.restore(trainer, ckpt_dir)
    on_main(trainer.accelerator, lambda: manager.set_aside_damaged(trainer, resume))
    trainer.state = st
    run_dir = trainer.run_dir
    if st.epoch >= cfg.train.epochs and st.iteration == 0:
        export = run_dir / "export" / "latentflow.json"
        if export.exists() and json.loads(export.read_text()).get("step") == st.step:
            trainer.say(
                f"{run_dir} has finished all {st.epoch} epochs; nothing to do. To train it further, "
                f"resume with --set train.epochs=N (N > {st.epoch})"
            )
            return False
        trainer.say(f"{run_dir} has finished training; writing its final grid and export")
    on_main(trainer.accelerator, lambda: manager.rewrite_run_files(trainer, st, changes, ckpt_dir))
    where = (
        f"epoch {st.epoch + 1}, step {st.iteration}/{trainer.batches.iterations_per_epoch} of it"
        if st.iteration
        else f"the start of epoch {st.epoch + 1}"
    )
    trainer.say(
        f"resuming {run_dir} from {ckpt_dir.name} (optimizer step {st.step}, {where})"
        + (f"; changed {', '.join(changes)}" if changes else "")
    )
    manager.restore_rng()  # last, so that nothing between here and the loop draws from the restored generators
    return True
