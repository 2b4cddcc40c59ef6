"""``train(cfg, options)``: the one training function, in canonical Accelerate order.

    setup            VAE, data, model (from the seed alone), latent cache, EMA, optimizer,
                     ``prepare``, then resume: weights, optimizer, TrainState, RNG (setup.py)
    train_one_epoch  per step: this rank's batch and random stream -> ``accumulate`` /
                     ``backward`` / clip on ``sync_gradients`` / step / EMA; log, checkpoint
                     every ``train.checkpoint_every`` steps, stop cleanly on a signal
    end_of_epoch     epoch summary, grid from fixed noise with the EMA weights, checkpoint
    finish           final grid, curves, the export (a LatentFlowPipeline directory)

Everything that changes as training goes lives in ``TrainState``; its ``state_dict()`` is
what a checkpoint stores beside the weights, so a run killed at any moment and resumed
from a checkpoint continues bit for bit (docs/reliability.md).

Only the main process writes files and tells the user anything (through the ``console``
the command passes). Every process runs the same collectives in the same order: the
decisions that guard them (skip a step, stop, checkpoint) come from values all ranks
share, and a failure on the main process reaches all of them (``distributed.on_main``).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ..config import ExperimentConfig
from ..console import Bar, Console
from ..distributed import is_launched, is_main_rank, is_peer_failure, make_accelerator, on_main
from ..errors import LatentflowError, PeerLost, Stopped
from ..figures import save_loss_by_time, save_loss_curve
from ..pipeline import save_pipeline
from ..runs import run_base_name, runs_of
from ..signals import RunLock, StopRequest
from .checkpoints import recorded_precision, resolve_resume
from .objective import training_loss
from .optim import all_finite, learning_rate
from .progress import draw_grid, ema_pipeline, evaluate_during_training, validation_loss
from .setup import setup
from .state import TIME_BINS, Interrupted, RunOptions, Trainer
from .tracking import log_image, tracker_for

__all__ = ["EpochStats", "StepResult", "end_of_epoch", "finish", "train", "train_one_epoch", "train_step"]


class EpochStats:
    """Device-side sums of one epoch (the loss over good steps, the per-sample loss by t bin)
    and of the current log interval. A checkpoint records their global values in the
    TrainState; on resume the main process starts from them and the others from zero, so
    the next reduction over ranks gives the uninterrupted run's sums."""

    def __init__(self, trainer: Trainer):
        st, device, own = trainer.state, trainer.accelerator.device, trainer.is_main

        def tensor(value, zero):
            return torch.tensor(value if own else zero, device=device, dtype=torch.float64)

        self.loss_sum, self.loss_count = tensor(st.loss_sum, 0.0), tensor(st.loss_count, 0.0)
        self.bin_sum, self.bin_count = tensor(st.bin_sum, [0.0] * TIME_BINS), tensor(st.bin_count, [0.0] * TIME_BINS)
        self.window_loss, self.window_grad = tensor(st.window_loss, 0.0), tensor(st.window_grad, 0.0)
        self.window_steps = st.window_steps  # the same on every rank
        self.window_start, self.window_ran = time.perf_counter(), 0  # for throughput: steps run here
        self.steps_run = 0  # optimizer-step attempts of this process, for throughput

    def add_step(self, result: StepResult) -> None:
        self.loss_sum += result.loss.double()
        self.loss_count += 1
        self.bin_sum += result.bin_sum.double()
        self.bin_count += result.bin_count.double()
        self.window_loss += result.loss.double()
        self.window_grad += result.grad_norm.double()
        self.window_steps += 1
        self.window_ran += 1

    def carry_window(self, previous: EpochStats) -> EpochStats:
        """Continue ``previous``'s log interval (it spans epoch ends)."""
        self.window_loss, self.window_grad = previous.window_loss, previous.window_grad
        self.window_steps, self.window_ran, self.window_start = (
            previous.window_steps,
            previous.window_ran,
            previous.window_start,
        )
        return self

    def global_sums(self, acc) -> List[float]:
        t = torch.cat(
            [
                self.loss_sum[None],
                self.loss_count[None],
                self.bin_sum,
                self.bin_count,
                self.window_loss[None],
                self.window_grad[None],
            ]
        )
        return (acc.reduce(t, "sum") if acc.num_processes > 1 else t).tolist()

    def fold_into(self, trainer: Trainer) -> None:
        """Record the global sums so far in the TrainState (every rank calls it)."""
        t, st, n = self.global_sums(trainer.accelerator), trainer.state, TIME_BINS
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


def train_step(trainer: Trainer, epoch: int, iteration: int) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches of this rank."""
    cfg, acc, model = trainer.cfg, trainer.accelerator, trainer.model
    device, accum = acc.device, cfg.train.grad_accum
    poison = bool(trainer.faults) and trainer.faults.poison_loss(
        epoch * trainer.batches.iterations_per_epoch + iteration + 1
    )
    losses, bin_sum, bin_count = [], torch.zeros(TIME_BINS, device=device), torch.zeros(TIME_BINS, device=device)
    skipped, grad_norm = False, torch.zeros((), device=device)
    for micro in range(accum):
        gen = trainer.rng.at(epoch, iteration, micro)
        mean, std, labels = (t.to(device, non_blocking=True) for t in trainer.batches.batch(epoch, iteration, micro))
        with acc.accumulate(model):
            z = mean + std * torch.randn(std.shape, device=device, generator=gen)  # a fresh posterior sample
            x1 = trainer.vae.scale(z)  # (B, c, h, w) data end of the path
            if cfg.model.unconditional:
                labels = torch.full_like(labels, trainer.raw_model.null_label)  # p(x): every label is "none"
            per_sample, t, error = training_loss(
                model,
                x1,
                labels,
                cfg.flow,
                cfg.model.class_dropout,
                trainer.raw_model.null_label,
                gen,
                cfg_scale=cfg.sampler.cfg_scale,
                step=trainer.state.step,
            )
            loss = per_sample.mean() * float("inf") if poison else per_sample.mean()
            bins = (t * TIME_BINS).long().clamp_(max=TIME_BINS - 1)  # (B,)
            bin_sum.index_add_(0, bins, error.detach().float())
            bin_count.index_add_(0, bins, torch.ones_like(t))
            losses.append(loss.detach() if error is per_sample else error.detach().mean())
            acc.backward(loss)
            if acc.sync_gradients:
                clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                grad_norm = acc.clip_grad_norm_(model.parameters(), clip)
                # fp16: the grad scaler skips non-finite steps itself (and must see them to
                # lower its scale); otherwise skip here. One host sync per optimizer step.
                skipped = acc.scaler is None and not bool(torch.isfinite(grad_norm))
                if not skipped:
                    trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
    if acc.scaler is not None and acc.optimizer_step_was_skipped:
        skipped = True
    return StepResult(torch.stack(losses).mean(), grad_norm.detach(), bin_sum, bin_count, skipped)


def _stop_agreed(trainer: Trainer) -> int:
    """The stop code of any rank that was asked to stop (0: none); every rank gets the same."""
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return trainer.stop.code
    import torch.distributed as dist

    code = torch.tensor([trainer.stop.code], device=acc.device, dtype=torch.int32)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return int(code.item())


def _progress_bar(trainer: Trainer, epoch: int):
    if not trainer.interactive:
        return Bar()
    return trainer.console.bar(
        trainer.batches.iterations_per_epoch, trainer.state.iteration, f"epoch {epoch + 1}/{trainer.cfg.train.epochs}"
    )


def train_one_epoch(trainer: Trainer, epoch: int) -> EpochStats:
    cfg, st = trainer.cfg, trainer.state
    n = trainer.batches.iterations_per_epoch
    stats = EpochStats(trainer)
    trainer.model.train()
    bar = _progress_bar(trainer, epoch)
    for iteration in range(st.iteration, n):
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(cfg.train, st.step, cfg.train.epochs * n)
        result = train_step(trainer, epoch, iteration)
        st.iteration, stats.steps_run = iteration + 1, stats.steps_run + 1
        if result.skipped:
            st.nonfinite_run, st.nonfinite_total = st.nonfinite_run + 1, st.nonfinite_total + 1
            if st.nonfinite_run >= cfg.train.max_nonfinite:
                raise trainer.diverged(
                    f"loss or gradients were non-finite for {st.nonfinite_run} steps in a row "
                    f"(optimizer step {st.step}, epoch {epoch + 1})"
                )
        else:
            st.nonfinite_run, st.step = 0, st.step + 1
            trainer.ema.update(trainer.raw_model)
            stats.add_step(result)
            if trainer.faults:
                trainer.faults.after_step(st.step, trainer.raw_model)
            if st.step % cfg.train.log_every == 0:
                if not all_finite(trainer.raw_model):  # cheap, at the log interval only
                    raise trainer.diverged(
                        f"the weights became non-finite by optimizer step {st.step} (epoch {epoch + 1})"
                    )
                _log_interval(trainer, stats, epoch, bar)
        bar.update()
        stopping = _stop_agreed(trainer)
        if stopping or (not result.skipped and trainer.checkpoints.due(st.step, st.iteration, n)):
            trainer.checkpoints.save(trainer, stats)
        if stopping:
            bar.close()
            _interrupt(trainer, stopping)
        if not result.skipped and trainer.faults:
            trainer.faults.after_checkpoint(st.step)
    bar.close()
    return stats


def _log_interval(trainer: Trainer, stats: EpochStats, epoch: int, bar) -> None:
    """The loss reading every ``log_every`` steps: the only host sync beyond the skip check."""
    acc, st, cfg = trainer.accelerator, trainer.state, trainer.cfg
    values = torch.stack([stats.window_loss, stats.window_grad])
    total = acc.reduce(values, "sum") if acc.num_processes > 1 else values
    loss, grad = (total / (stats.window_steps * acc.num_processes)).tolist()
    seconds = time.perf_counter() - stats.window_start
    images_per_s = stats.window_ran * trainer.batches.global_batch * cfg.train.grad_accum / max(seconds, 1e-9)
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.log(
        {
            "event": "step",
            "epoch": epoch + 1,
            "step": st.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad,
            "images_per_s": images_per_s,
        }
    )
    acc.log(
        {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad, "train/images_per_s": images_per_s}, step=st.step
    )
    if not trainer.interactive:
        trainer.say(
            f"step {st.step:6d}  epoch {epoch + 1}/{cfg.train.epochs} "
            f"({st.iteration}/{trainer.batches.iterations_per_epoch})  loss {loss:.4f}  grad {grad:.3f}  "
            f"lr {lr:.2e}  {images_per_s:6.0f} img/s"
        )
    else:
        bar.set_postfix(loss=f"{loss:.4f}")
    stats.window_loss.zero_()
    stats.window_grad.zero_()
    stats.window_steps, stats.window_ran, stats.window_start = 0, 0, time.perf_counter()


def _epoch_record(trainer: Trainer, epoch: int, stats: EpochStats, seconds: float) -> dict:
    """The epoch's summary over all ranks, and the TrainState moved to the next epoch."""
    acc, st, cfg = trainer.accelerator, trainer.state, trainer.cfg
    t = stats.global_sums(acc)
    count = int(t[1])
    bins = [s / max(c, 1) for s, c in zip(t[2 : 2 + TIME_BINS], t[2 + TIME_BINS : 2 + 2 * TIME_BINS])]
    images_per_s = stats.steps_run * cfg.train.grad_accum * trainer.batches.global_batch / max(seconds, 1e-9)
    st.epoch, st.iteration = epoch + 1, 0
    st.loss_sum, st.loss_count = 0.0, 0
    st.bin_sum, st.bin_count = [0.0] * TIME_BINS, [0.0] * TIME_BINS
    return {
        "event": "epoch",
        "epoch": epoch + 1,
        "step": st.step,
        "loss": t[0] / count if count else None,
        "seconds": seconds,
        "images_per_s": images_per_s,
        "good_steps": count // acc.num_processes,
        "nonfinite_steps": st.nonfinite_total,
        "loss_by_time": bins,
        "val_loss": None,
    }


def end_of_epoch(trainer: Trainer, epoch: int, stats: EpochStats, seconds: float) -> None:
    acc, st, cfg = trainer.accelerator, trainer.state, trainer.cfg
    record = _epoch_record(trainer, epoch, stats, seconds)
    if record["loss"] is None:  # not one good step: nothing learned, and nothing worth saving
        raise trainer.diverged(f"every step of epoch {epoch + 1} was skipped (non-finite loss or gradients)")
    trainer.ema.materialize()  # a collective under FSDP: before only the main process draws
    if len(trainer.batches.val_rows):
        if cfg.model.unconditional:
            raise LatentflowError("data.val_fraction with model.unconditional is not supported; set one of them off")
        record["val_loss"] = validation_loss(trainer.ema.model, trainer.batches, trainer.vae, cfg.flow, cfg.train.seed)
        if record["val_loss"] < st.best_val:
            st.best_val, st.best_epoch = record["val_loss"], epoch + 1
    on_main(acc, lambda: _write_epoch(trainer, epoch, record))
    trainer.checkpoints.save(trainer, EpochStats(trainer).carry_window(stats))  # the next epoch's sums: zero


def _write_epoch(trainer: Trainer, epoch: int, record: dict) -> None:
    """Main process: the grid, the log record, the best export, the tracker, one line."""
    acc, st, cfg = trainer.accelerator, trainer.state, trainer.cfg
    pipe = ema_pipeline(trainer)
    figure, grid = None, None
    if _due(cfg.train.grid_every, epoch, cfg.train.epochs):
        figure = trainer.run_dir / "figures" / f"epoch_{epoch + 1:03d}.png"
        try:
            grid = draw_grid(trainer, pipe, figure)
        except Stopped:  # a signal during the grid: the checkpoint still comes, the rest waits for the resume
            trainer.append_log(record)
            trainer.say(
                f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {record['loss']:.4f}  (grid stopped on request)"
            )
            return
    trainer.append_log(record)
    val_loss, best = record["val_loss"], st.best_epoch == epoch + 1
    if val_loss is not None and best:  # the best so far: keep it as best/
        info = {"run": str(trainer.run_dir), "step": st.step, "epoch": epoch + 1, "val_loss": val_loss}
        save_pipeline(pipe, trainer.run_dir / "best", cfg, info)
    scalars = {
        "epoch/loss": record["loss"],
        "epoch/images_per_s": record["images_per_s"],
        "epoch/nonfinite_steps": st.nonfinite_total,
        "epoch/val_loss": val_loss,
    }
    acc.log({k: v for k, v in scalars.items() if v is not None}, step=st.step)
    if grid is not None:
        log_image(acc, "grid", grid, st.step)
    loss_text = f"loss {record['loss']:.4f}"
    val_text = "" if val_loss is None else f"  val {val_loss:.4f}{' (best)' if best else ''}"
    trainer.say(
        f"epoch {epoch + 1:3d}/{cfg.train.epochs}  {loss_text}{val_text}  {record['seconds']:6.1f} s  "
        f"{record['images_per_s']:7.0f} img/s" + (f"  -> {figure.parent.name}/{figure.name}" if figure else "")
    )
    if _due(cfg.train.eval_every, epoch, cfg.train.epochs):
        try:
            evaluate_during_training(trainer, pipe, epoch)
        except Stopped:
            trainer.say("  eval stopped on request")


def _due(every: int, epoch: int, epochs: int) -> bool:
    """Whether a thing done every ``every`` epochs (and at the last; never for 0) is due at
    the end of ``epoch`` (0-based)."""
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


def finish(trainer: Trainer) -> Path:
    """The final grid, the loss curves and the export."""
    cfg, st = trainer.cfg, trainer.state
    trainer.ema.materialize()
    if not all_finite(trainer.ema.model):
        raise trainer.diverged("the EMA weights are non-finite at the end of training (not exported)")

    def write() -> Path:
        figures = trainer.run_dir / "figures"
        pipe = ema_pipeline(trainer)
        try:
            draw_grid(trainer, pipe, figures / "final.png")
        except Stopped:
            return None  # the resume writes the final grid and the export
        log_file = trainer.run_dir / "log.jsonl"
        save_loss_curve(log_file, figures / "loss.png", title=f"{cfg.name}: {cfg.model.name}")
        save_loss_by_time(log_file, figures / "loss_by_time.png", title=f"{cfg.name}: loss by t")
        info = {
            "run": str(trainer.run_dir),
            "checkpoint": str(trainer.checkpoints.last),
            "step": st.step,
            "epoch": st.epoch,
        }
        export = save_pipeline(pipe, trainer.run_dir / "export", cfg, info)
        trainer.say(f"done: {trainer.run_dir}  (export: {export}, final grid: {figures / 'final.png'})")
        return export

    export = on_main(trainer.accelerator, write)
    if export is None:
        _interrupt(trainer, trainer.stop.code or 2)
    return export


def _interrupt(trainer: Trainer, code: int) -> None:
    reason, status = StopRequest.describe(code)
    raise Interrupted(
        f"stopped ({reason}) after optimizer step {trainer.state.step}; checkpoint {trainer.checkpoints.last}", status
    )


def _where(cfg: ExperimentConfig, options: RunOptions, console: Console):
    """The run to continue (a ``Resume``), or None for a new run. ``--resume latest`` with no
    run of this experiment starts fresh and says so; with runs of the same experiment under
    other overrides it is refused, naming the difference: a resume is never quietly a new run."""
    base = run_base_name(cfg.name, options.overrides)
    resume = resolve_resume(options.resume, options.output_dir, base) if options.resume else None
    if options.resume == "latest" and resume is None:
        _refuse_other_overrides(cfg, options)
        if is_main_rank():
            others = runs_of(options.output_dir, base)
            why = f" ({len(others)} without a checkpoint)" if others else ""
            console.line(
                f"--resume latest: no checkpoint of experiment {base!r} under {options.output_dir}{why}; starting fresh"
            )
    return resume


def _refuse_other_overrides(cfg: ExperimentConfig, options: RunOptions) -> None:
    from ..config import read_yaml_mapping
    from ..errors import CheckpointError
    from .checkpoints import check_same_setup

    output = Path(options.output_dir)
    pattern = re.compile(rf"^{re.escape(cfg.name)}(\+.*)?-\d{{8}}-\d{{6}}(-\d+)?$")
    runs = [p for p in output.iterdir() if p.is_dir() and pattern.match(p.name)] if output.is_dir() else []
    runs = [r for r in runs if (r / "config.yaml").is_file() and list((r / "checkpoints").glob("step_*"))]
    if not runs:
        return
    newest = max(runs, key=lambda r: (r / "config.yaml").stat().st_mtime)
    try:
        check_same_setup(read_yaml_mapping(newest / "config.yaml", "run config"), cfg, newest)
    except CheckpointError as exc:
        raise CheckpointError(
            f"--resume latest: the newest run of experiment {cfg.name!r} ({newest.name}) cannot continue with these "
            f"settings ({str(exc).split(': ', 1)[-1]}); drop the --set overrides that differ, or leave out --resume "
            "to start a new run"
        ) from None


def _precision(options: RunOptions, resume) -> Optional[str]:
    """The precision a resumed run was trained in, unless a flag or the launcher chose one."""
    if options.mixed_precision or resume is None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return options.mixed_precision
    return recorded_precision(resume[1])


def train(cfg: ExperimentConfig, options: RunOptions, console: Optional[Console] = None) -> Optional[Path]:
    """Train ``cfg`` (a new run directory under ``options.output_dir``, or ``options.resume``
    continued) and return the run directory; None when a resumed run had nothing left to do.
    ``console`` receives what the user is told (main process only; default: nothing)."""
    from ..files import check_output

    console = console or Console()
    stop = StopRequest(on_exit=console.line)
    if is_launched():
        stop.watch_parent()  # also while setting up: a dead launcher ends a long encode
    check_output(options.output_dir, overwrite=True, flag="--output-dir", directory=True)
    resume = _where(cfg, options, console)  # before anything is built: it decides the precision
    accelerator = make_accelerator(
        _precision(options, resume),
        options.cpu,
        cfg.train.grad_accum,
        options.dist_timeout,
        log_with=tracker_for(cfg.train.log_with),
        project_dir=str(options.output_dir),
    )
    lock: List[RunLock] = []
    trainer = None
    try:
        trainer = setup(cfg, options, accelerator, stop, lock, resume, console)
        if trainer is None:
            return None
        stop.install()  # from here a signal stops the loop cleanly, with a checkpoint
        for epoch in range(trainer.state.epoch, cfg.train.epochs):
            start = time.perf_counter()
            stats = train_one_epoch(trainer, epoch)
            end_of_epoch(trainer, epoch, stats, time.perf_counter() - start)
            stopping = _stop_agreed(trainer)  # a signal during the epoch's grid or evaluation
            if stopping:
                _interrupt(trainer, stopping)
        finish(trainer)
        return trainer.run_dir
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        last = trainer.checkpoints.last if trainer is not None else None
        raise PeerLost(
            f"process {accelerator.process_index} lost contact with the others ({str(exc).splitlines()[0][-90:]}): "
            f"one died or stalled for over --dist-timeout {options.dist_timeout:g} s; the job stops. "
            f"Last checkpoint: {last or 'none'}"
        ) from None
    except Stopped:  # during setup (the latent cache), before there was a run to checkpoint
        reason, status = StopRequest.describe(stop.code or 2)
        raise Interrupted(
            f"stopped ({reason}) while setting up; the latent cache keeps the shards already encoded, "
            "and nothing else was written",
            status,
        ) from None
    except Interrupted as exc:
        exc.run_dir = trainer.run_dir if trainer is not None else None
        raise
    finally:
        stop.uninstall()
        for held in lock:
            held.release()
        accelerator.end_training()
