"""The training objective of one batch: noise, times and label dropout drawn from the step's
generator, then the conditional flow-matching loss of ``flow.py``."""

from __future__ import annotations

from typing import Optional

import torch

from ..flow import cfm_loss, sample_time

__all__ = ["drop_labels", "training_loss"]


def drop_labels(labels: torch.Tensor, prob: float, null_label: int, generator: Optional[torch.Generator] = None):
    """Replace each label by ``null_label`` with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_loss(model, x1, labels, flow, class_dropout: float, null_label: int, generator=None):
    """Per-sample CFM loss (B,) and the times t (B,) for one batch of model-space latents:
    noise, times and label dropout from ``generator``. Shared by training and the benchmark."""
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)  # (B, c, h, w) noise
    t = sample_time(
        x1.shape[0],
        flow.time_sampler,
        device=x1.device,
        generator=generator,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        t_max=flow.t_max,
    )  # (B,)
    y = drop_labels(labels, class_dropout, null_label, generator)
    return cfm_loss(model, x0, x1, t, flow.sigma_min, y=y), t
