"""``train(cfg, runtime)``: the one training function, in canonical Accelerate order.

build (VAE, data, latent cache, model, EMA, optimizer) -> ``prepare`` -> resume -> loop
(``accumulate`` / ``backward`` / clip on ``sync_gradients`` / step / EMA) -> end of epoch
(grid from fixed noise and labels with the EMA weights, checkpoint) -> export.

Only the main process writes files and prints; every process runs the same collectives in
the same order, so no rank waits on a barrier another rank never reaches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
    resolve_resume,
    save_checkpoint,
    save_export,
)
from .config import ExperimentConfig, config_to_dict, save_config
from .data import build_dataset
from .ema import EMA
from .errors import LatentflowError
from .figures import class_grid_labels, save_grid, save_loss_by_time, save_loss_curve
from .flow import cfm_loss, sample_time
from .latents import default_cache_dir, load_or_build_cache
from .models import create_model
from .sampling import sample_images
from .vae import FrozenVAE

__all__ = ["Runtime", "drop_labels", "resolve_mixed_precision", "train", "training_loss"]

TIME_BINS = 10  # equal-width bins of t for the loss-by-time statistics


@dataclass
class Runtime:
    """Where and how to run; not part of the experiment."""

    output_dir: Path = Path("runs")
    resume: Optional[str] = None  # 'latest', a run directory or a checkpoint directory
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None: the launcher's, else auto
    cpu: bool = False
    cache_dir: Optional[Path] = None


class TrainingDiverged(LatentflowError):
    pass


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


def use_cpu_backend(cpu_flag: bool) -> bool:
    """Accelerate picks its gloo CPU backend only when told to run on the CPU; without a
    GPU, a multi-process launch would otherwise become N unrelated single-process runs."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return cpu_flag or (launched and not torch.cuda.is_available())


def drop_labels(labels: torch.Tensor, prob: float, null_label: int) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_loss(model, x1: torch.Tensor, labels: torch.Tensor, flow, class_dropout: float, null_label: int):
    """Per-sample CFM loss (B,) and the times t (B,) for one batch of model-space latents:
    noise, times, label dropout, loss. Shared by ``train`` and the benchmark."""
    x0 = torch.randn_like(x1)  # (B, c, h, w) noise end of the path
    t = sample_time(
        x1.shape[0], flow.time_sampler, device=x1.device, logit_mean=flow.logit_mean, logit_std=flow.logit_std
    )  # (B,)
    y = drop_labels(labels, class_dropout, null_label)
    return cfm_loss(model, x0, x1, t, flow.sigma_min, y=y), t


def _check_same_setup(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A resumed run must train the same model on the same data with the same VAE."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = config_to_dict(cfg)
    for section in ("data", "vae", "model", "flow"):
        for key, value in now[section].items():
            if saved.get(section, {}).get(key) != value:
                raise CheckpointError(
                    f"cannot resume {run_dir}: it was trained with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r}, this config says {value!r}; "
                    f"use the run's own config ({run_dir / 'config.yaml'})"
                )


def train(cfg: ExperimentConfig, rt: Runtime) -> Optional[Path]:
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(rt.mixed_precision, rt.cpu),
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=use_cpu_backend(rt.cpu),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise LatentflowError(
            f"the launcher started {launched} processes but Accelerate set up {accelerator.num_processes}; "
            "check `accelerate config` (distributed type) or pass --cpu"
        )
    is_main, device = accelerator.is_main_process, accelerator.device
    say = tqdm.write if is_main else (lambda *_: None)
    set_seed(cfg.train.seed)  # identical initialisation on every rank

    # --- where: a new run, or the one being resumed ----------------------------------------
    resume = resolve_resume(rt.resume, rt.output_dir, cfg.name) if rt.resume else None
    if rt.resume == "latest" and resume is None:
        say(f"--resume latest: no checkpoint of {cfg.name!r} under {rt.output_dir}; starting fresh")
    if resume is not None:
        _check_same_setup(resume[0], cfg)

    # --- build ----------------------------------------------------------------------------
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).to(device)
    latent_shape = vae.latent_shape(cfg.data.image_size)  # (c, h, w)
    dataset = build_dataset(cfg.data, channels=vae.in_channels)
    try:
        model = create_model(
            cfg.model.name, input_size=latent_shape[1], in_channels=latent_shape[0], num_classes=dataset.num_classes
        )
    except ValueError as exc:
        raise LatentflowError(f"model.name {cfg.model.name}: {exc}") from None
    cache, cache_path = load_or_build_cache(
        vae, dataset, rt.cache_dir or default_cache_dir(), accelerator, cfg.vae.encode_batch_size,
        progress=(lambda it: tqdm(it, desc="encode", leave=False)) if is_main else None,
    )
    world_batch = cfg.train.batch_size * accelerator.num_processes
    loader = DataLoader(
        cache,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=len(cache) >= world_batch,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    model.to(device)
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def set_lr(step: int) -> None:  # linear warmup over warmup_steps, then constant
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))

    raw_model = accelerator.unwrap_model(model)
    null_label = raw_model.null_label

    # --- resume -----------------------------------------------------------------------------
    start_epoch, step = 0, 0
    if resume is not None:
        run_dir, ckpt_dir = resume
        ckpt = load_checkpoint(ckpt_dir, device)
        try:
            raw_model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"], ckpt["state"]["ema_updates"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt_dir} does not fit model {cfg.model.name}: {str(exc).splitlines()[0]}") from None
        start_epoch, step = ckpt["state"]["epoch"], ckpt["state"]["step"]
        say(f"resuming {run_dir} from epoch {start_epoch} (step {step})")
    else:
        run_dir = new_run_dir(rt.output_dir, cfg.name) if is_main else None

    figures, log_file = (run_dir / "figures", run_dir / "log.jsonl") if is_main else (None, None)
    if is_main:
        figures.mkdir(exist_ok=True)
        if resume is None:
            save_config(cfg, run_dir / "config.yaml")

    def log(record: dict) -> None:
        if is_main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    n_params = sum(p.numel() for p in raw_model.parameters())
    say(
        f"run {run_dir}  |  {cfg.model.name} ({n_params / 1e6:.2f} M params) on {len(cache)} latents "
        f"{tuple(latent_shape)}  |  {accelerator.num_processes} process(es) on {device.type}, "
        f"mixed precision {accelerator.mixed_precision}  |  cache {cache_path.name}"
    )

    # --- loop -----------------------------------------------------------------------------
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    grid_labels = class_grid_labels(dataset.num_classes, cfg.sampler.grid_per_class) or None
    grid_count = len(grid_labels) if grid_labels else cfg.sampler.grid_per_class * 8
    fp16 = accelerator.mixed_precision == "fp16"
    nonfinite_run = nonfinite_total = 0
    last_ckpt = latest_checkpoint(run_dir) if resume is not None else None

    def draw_grid(path: Path) -> None:
        result = sample_images(
            ema.model, vae, latent_shape, grid_labels, grid_count,
            solver=cfg.sampler.solver, steps=cfg.sampler.steps, cfg_scale=cfg.sampler.cfg_scale,
            guidance_interval=cfg.sampler.guidance_interval, atol=cfg.sampler.atol, rtol=cfg.sampler.rtol,
            seed=cfg.train.seed, autocast=accelerator.autocast,
        )
        save_grid(result.images, path, ncol=cfg.sampler.grid_per_class if grid_labels else 8)

    set_lr(step)
    for epoch in range(start_epoch, cfg.train.epochs):
        loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        bin_sum = torch.zeros(TIME_BINS, device=device)  # per-sample loss summed by t bin
        bin_count = torch.zeros(TIME_BINS, device=device)
        window = torch.zeros((), device=device)
        window_n = good_steps = 0
        epoch_start = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not is_main, leave=False)
        for mean, std, labels, _ in loader:
            with accelerator.accumulate(model):
                z = mean + std * torch.randn_like(std)  # a fresh posterior sample each step
                x1 = vae.scale(z)  # (B, c, h, w) data end of the path
                per_sample, t = training_loss(model, x1, labels, cfg.flow, cfg.model.class_dropout, null_label)
                loss = per_sample.mean()
                bins = (t * TIME_BINS).long().clamp_(max=TIME_BINS - 1)  # (B,)
                bin_sum.index_add_(0, bins, per_sample.detach())
                bin_count.index_add_(0, bins, torch.ones_like(t))
                accelerator.backward(loss)
                skip = False
                if accelerator.sync_gradients:
                    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                    # fp16: the grad scaler skips non-finite steps itself (and must see them
                    # to lower its scale); otherwise skip here. One sync per optimizer step.
                    skip = not fp16 and not bool(torch.isfinite(grad_norm))
                if not skip:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if skip or (fp16 and accelerator.optimizer_step_was_skipped):
                nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
                if nonfinite_run >= cfg.train.max_nonfinite:
                    raise TrainingDiverged(
                        f"loss or gradients were non-finite for {nonfinite_run} steps in a row (step {step}, "
                        f"epoch {epoch + 1}); last good checkpoint: {last_ckpt or 'none'}; "
                        "lower train.lr, or use --mixed-precision bf16 instead of fp16"
                    )
            else:
                nonfinite_run = 0
                step += 1
                set_lr(step)
                ema.update(raw_model)
                loss_sum += loss.detach()
                window += loss.detach()
                window_n += 1
                good_steps += 1
            bar.update()
            if step % cfg.train.log_every == 0 and window_n:
                value = accelerator.reduce(window / window_n, "mean").item()  # the only sync
                window.zero_()
                window_n = 0
                bar.set_postfix(loss=f"{value:.4f}")
                log({"event": "step", "epoch": epoch + 1, "step": step, "loss": value, "lr": optimizer.param_groups[0]["lr"]})
        bar.close()
        epoch_loss = accelerator.reduce(loss_sum / max(1, good_steps), "mean").item()
        bin_loss = (accelerator.reduce(bin_sum, "sum") / accelerator.reduce(bin_count, "sum").clamp_min(1)).tolist()
        seconds = time.perf_counter() - epoch_start
        images_per_s = steps_per_epoch * cfg.train.grad_accum * world_batch / seconds
        if is_main:
            draw_grid(figures / f"epoch_{epoch + 1:03d}.png")
            state = {
                "epoch": epoch + 1, "step": step, "ema_updates": ema.updates, "loss": epoch_loss,
                "nonfinite_steps": nonfinite_total, "model": cfg.model.name, "latent_shape": list(latent_shape),
            }
            last_ckpt = save_checkpoint(
                run_dir, epoch + 1, raw_model.state_dict(), ema.state_dict(), optimizer.state_dict(), state,
                keep=cfg.train.keep_checkpoints,
            )
            log({"event": "epoch", "epoch": epoch + 1, "step": step, "loss": epoch_loss, "seconds": seconds,
                 "images_per_s": images_per_s, "nonfinite_steps": nonfinite_total, "loss_by_time": bin_loss})
            say(
                f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {epoch_loss:.4f}  {seconds:6.1f} s  "
                f"{images_per_s:7.0f} img/s  -> {figures.name}/epoch_{epoch + 1:03d}.png"
            )
        accelerator.wait_for_everyone()

    # --- final outputs --------------------------------------------------------------------
    if is_main:
        draw_grid(figures / "final.png")
        if log_file.exists() and log_file.stat().st_size:
            save_loss_curve(log_file, figures / "loss.png", title=f"{cfg.name}: {cfg.model.name}")
            save_loss_by_time(log_file, figures / "loss_by_time.png", title=f"{cfg.name}: loss by t")
        info = {
            "model": cfg.model.name, "latent_shape": list(latent_shape), "num_classes": dataset.num_classes,
            "vae": cfg.vae.pretrained, "vae_identity": vae.identity, "epoch": cfg.train.epochs, "step": step,
        }
        export = save_export(run_dir, ema.state_dict(), cfg, info)
        say(f"done: {run_dir}  (export: {export}, final grid: {figures / 'final.png'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
