"""What a run shows of its progress at epoch ends: the grid drawn through the pipeline it will
export, the validation loss at fixed noise, and evaluation during training."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..figures import image_grid, save_grid
from ..files import atomic_file
from ..flow import cfm_loss
from ..pipeline import LatentFlowPipeline, pipeline_from_parts
from ..rng import STREAM_VALID, derive_seed
from .state import Trainer

__all__ = ["draw_grid", "ema_pipeline", "evaluate_during_training", "listening", "validation_loss"]


def listening(trainer: Trainer):
    """What a long drawing asks between velocity evaluations: has this process been asked to stop?"""
    return lambda: trainer.stop.requested


def ema_pipeline(trainer: Trainer) -> LatentFlowPipeline:
    """The run's pipeline with its current EMA weights: what the export holds, and what the
    grid and evaluation during training draw from."""
    return pipeline_from_parts(trainer.ema.model, trainer.vae, trainer.cfg, trainer.facts["class_names"])


def draw_grid(trainer: Trainer, pipe: LatentFlowPipeline, path: Path) -> np.ndarray:
    """The grid of the fixed noise and labels (one row per class), saved to ``path``;
    returns it as an (H, W, C) uint8 array. A stop request ends it (``Stopped``)."""
    cfg, labels = trainer.cfg, trainer.grid_labels
    count = len(labels) if labels else cfg.sampler.grid_per_class * 8
    result = pipe.draw(labels, count, generator=torch.Generator().manual_seed(cfg.train.seed), stop=listening(trainer))
    ncol = cfg.sampler.grid_per_class if labels else 8
    with atomic_file(path, "figure") as tmp:
        save_grid(result.images, tmp, ncol=ncol, format="png")
    return image_grid(result.images, ncol)


@torch.no_grad()
def validation_loss(model, batches, vae, flow, seed: int, chunk: int = 256) -> float:
    """Mean CFM loss of ``model`` on the held-out rows at fixed times, noise and posterior
    samples (one stream per chunk of rows, seeded by its position), so that the value depends
    on the weights alone and compares across epochs and runs."""
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


def evaluate_during_training(trainer: Trainer, pipe: LatentFlowPipeline, epoch: int) -> None:
    """FD and accuracy of ``train.eval_samples`` EMA samples at the run's sampler settings
    (main process only): logged, sent to the tracker, and plotted in figures/eval.png."""
    from ..evaluation import evaluate_images, summary_line
    from ..figures import save_eval_curve

    cfg, st = trainer.cfg, trainer.state
    start = time.perf_counter()
    n = cfg.train.eval_samples
    samples = pipe.draw("all", n, generator=torch.Generator().manual_seed(cfg.train.seed + 1), stop=listening(trainer))
    result = evaluate_images(samples.images, samples.labels, trainer.evaluator["net"], trainer.evaluator["references"])
    seconds = time.perf_counter() - start
    trainer.append_log({"event": "eval", "epoch": epoch + 1, "step": st.step, "seconds": seconds, **result})
    scalars = {"eval/accuracy": result.get("accuracy")}
    for name, r in result["references"].items():
        scalars[f"eval/fd_{name}"] = r["fd"]
        scalars[f"eval/ratio_to_floor_{name}"] = r.get("ratio")
    trainer.accelerator.log({k: v for k, v in scalars.items() if v is not None}, step=st.step)
    save_eval_curve(
        trainer.run_dir / "log.jsonl", trainer.run_dir / "figures" / "eval.png", title=f"{cfg.name}: evaluation"
    )
    trainer.say(f"  eval ({n} samples, {seconds:.0f} s): {summary_line(result)}")
