"""Sampling: seeded noise -> (guided) velocity -> ODE solver -> unscale -> VAE decode.

Classifier-free guidance (Ho & Salimans 2022) is a thin wrapper around the velocity:
``v = v_uncond + s (v_cond - v_uncond)`` over all latent channels. ``s = 1`` is exactly
the conditional velocity and ``s = 0`` the unconditional one; both skip the second pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .solvers import integrate
from .vae import FrozenVAE

__all__ = ["SampleResult", "guided_velocity", "load_generator", "sample_images", "to_uint8"]


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


@torch.no_grad()
def sample_images(
    model: nn.Module,
    vae: FrozenVAE,
    latent_shape: Sequence[int],
    labels: Optional[Sequence[int]] = None,
    num_samples: Optional[int] = None,
    *,
    solver: str = "heun",
    steps: int = 10,
    cfg_scale: float = 1.0,
    guidance_interval: Optional[Sequence[float]] = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    seed: int = 0,
    batch_size: int = 500,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> SampleResult:
    """Draw images. ``labels`` (one per sample) or ``num_samples`` unconditional ones.

    The noise comes from a CPU generator seeded with ``seed``, so the same seed gives the
    same samples on any device and in any batch size.
    """
    device = next(model.parameters()).device
    n = len(labels) if labels is not None else int(num_samples)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *latent_shape), generator=gen)  # (N, c, h, w)
    label_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    autocast = autocast or contextlib.nullcontext
    out, nfe = [], 0
    model.eval()
    for start in range(0, n, batch_size):
        x0 = noise[start : start + batch_size].to(device)
        y = None if label_t is None else label_t[start : start + batch_size].to(device)
        with autocast():
            result = integrate(
                guided_velocity(model, y, cfg_scale, guidance_interval), x0, solver, steps, atol=atol, rtol=rtol
            )
        nfe = max(nfe, result.nfe)
        out.append(to_uint8(vae.decode(result.x.float())))
    labels_np = np.full(n, -1, dtype=np.int64) if label_t is None else label_t.numpy()
    return SampleResult(np.concatenate(out), labels_np, nfe)


def load_generator(checkpoint, device="cpu"):
    """(model, vae, cfg, info, latent_shape) from a run directory or an export."""
    from .checkpoint import load_export
    from .models import create_model

    state, cfg, info = load_export(checkpoint)
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).to(device)
    latent_shape = vae.latent_shape(cfg.data.image_size)
    model = create_model(
        cfg.model.name, input_size=latent_shape[1], in_channels=latent_shape[0], num_classes=info.get("num_classes", 10)
    )
    model.load_state_dict(state)
    return model.to(device).eval(), vae, cfg, info, latent_shape
