"""Sampling: seeded noise -> (guided) velocity -> ODE solver -> unscale -> VAE decode.

Classifier-free guidance (Ho & Salimans 2022) is a thin wrapper around the velocity:
``v = v_uncond + s (v_cond - v_uncond)`` over all latent channels. ``s = 1`` is exactly
the conditional velocity and ``s = 0`` the unconditional one; both skip the second pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import SamplerConfig
from .solvers import integrate
from .vae import FrozenVAE

__all__ = ["SampleResult", "guided_velocity", "sample_images", "to_uint8"]

_DEFAULTS = SamplerConfig()  # the one place sampler defaults live


def guided_velocity(
    model: nn.Module,
    labels: Optional[torch.Tensor],
    cfg_scale: float = 1.0,
    interval: Optional[Sequence[float]] = None,
) -> Callable:
    """velocity(x, t) of ``model`` for ``labels`` (None: unconditional) at guidance
    ``cfg_scale``, applied only while ``interval[0] <= t <= interval[1]`` if given."""
    null = getattr(model, "null_label", None)

    def unconditional(x, t):
        return model(x, t, None)

    if labels is None or cfg_scale == 0:
        return unconditional

    def conditional(x, t):
        return model(x, t, labels)

    if cfg_scale == 1:
        return conditional
    null_labels = torch.full_like(labels, null)

    def guided(x, t):
        if interval is not None and not bool(((t >= interval[0]) & (t <= interval[1])).all()):
            return model(x, t, labels)  # outside the guidance interval: plain conditional
        # one batched pass for both branches: (2B, C, H, W)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return guided


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class SampleResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 for unconditional
    nfe: int  # velocity evaluations per batch (each counts a guided pair once)
    latents: Optional[torch.Tensor] = None  # model-space x1 (N, c, h, w), if asked for
    trajectory: Optional[List[np.ndarray]] = None  # decoded x_t, uint8 (N, H, W, C) per time
    times: Optional[List[float]] = None


@torch.no_grad()
def sample_images(
    model: nn.Module,
    vae: FrozenVAE,
    latent_shape: Sequence[int],
    labels: Optional[Sequence[int]] = None,
    num_samples: Optional[int] = None,
    *,
    solver: str = _DEFAULTS.solver,
    steps: int = _DEFAULTS.steps,
    cfg_scale: float = _DEFAULTS.cfg_scale,
    guidance_interval: Optional[Sequence[float]] = _DEFAULTS.guidance_interval,
    atol: float = _DEFAULTS.atol,
    rtol: float = _DEFAULTS.rtol,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 500,
    autocast: Optional[Callable[[], ContextManager]] = None,
    decode: bool = True,
    trajectory_times: int = 0,
) -> SampleResult:
    """Draw images. ``labels`` (one per sample) or ``num_samples`` unconditional ones.

    The noise comes from ``generator`` (a CPU generator), else one seeded with ``seed``, so
    the same seed gives the same samples on any device and in any batch size.
    ``trajectory_times > 0`` also decodes x_t at that many evenly spaced times (fixed-step
    solvers: at step boundaries) for the trajectory figure.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype  # a pipeline loaded in fp16 samples in fp16
    n = len(labels) if labels is not None else int(num_samples)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *latent_shape), generator=gen)  # (N, c, h, w)
    label_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    autocast = autocast or contextlib.nullcontext
    images, latents, traj, times, nfe = [], [], [], None, 0
    model.eval()
    for start in range(0, n, batch_size):
        x0 = noise[start : start + batch_size].to(device, dtype)
        y = None if label_t is None else label_t[start : start + batch_size].to(device)
        with autocast():
            result = integrate(
                guided_velocity(model, y, cfg_scale, guidance_interval), x0, solver, steps, atol=atol, rtol=rtol,
                keep_trajectory=trajectory_times > 0,
            )
        nfe = max(nfe, result.nfe)
        x1 = result.x.float()  # (B, c, h, w)
        latents.append(x1.cpu())
        if decode:
            images.append(to_uint8(vae.decode(x1)))
        if trajectory_times > 0:
            pick = np.unique(np.linspace(0, len(result.trajectory) - 1, trajectory_times).round().astype(int))
            times = [result.times[i] for i in pick]
            traj.append([to_uint8(vae.decode(result.trajectory[i].float())) for i in pick])
    labels_np = np.full(n, -1, dtype=np.int64) if label_t is None else label_t.numpy()
    return SampleResult(
        images=np.concatenate(images) if decode else np.zeros((0,), np.uint8),
        labels=labels_np,
        nfe=nfe,
        latents=torch.cat(latents),
        trajectory=[np.concatenate([b[k] for b in traj]) for k in range(len(traj[0]))] if traj else None,
        times=times,
    )
