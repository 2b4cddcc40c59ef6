"""The σ_min conditional optimal-transport path (Lipman et al. 2023, "Flow Matching for
Generative Modeling", eq. 20-23).

Convention, used everywhere in latentflow: ``t = 0`` is noise, ``t = 1`` is data, and ``t``
always has shape ``(B,)``.

With noise ``x0 ~ N(0, I)`` and a data latent ``x1``::

    ψ_t(x0 | x1) = (1 - (1 - σ_min) t) · x0 + t · x1         (the conditional path)
    u_t(x0 | x1) = d/dt ψ_t = x1 - (1 - σ_min) · x0           (its velocity, the target)

The network ``v(x_t, t, y)`` regresses ``u_t`` with a mean squared error. At ``t = 1`` the
path sits at ``x1 + σ_min · x0``: a Gaussian of width σ_min around the data, which is why
σ_min is small (the seed uses 1e-3). ``sampling`` integrates ``dx/dt = v(x, t)`` from
``t = 0`` to ``t = 1`` with the same convention; ``tests/test_flow.py`` checks that the two
agree.

Everything here is pure tensor math: no modules, devices or files.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "TIME_SAMPLERS",
    "broadcast_time",
    "cfm_loss",
    "interpolate",
    "sample_time",
    "target_velocity",
]

Velocity = Callable[..., torch.Tensor]


def broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape ``t`` of shape (B,) so that it broadcasts against ``x`` of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """ψ_t(x0 | x1): the point at time ``t`` on the path from noise ``x0`` to data ``x1``."""
    tb = broadcast_time(t, x0)  # (B, 1, 1, 1)
    return (1 - (1 - sigma_min) * tb) * x0 + tb * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """u_t(x0 | x1) = x1 - (1 - σ_min) x0; constant in t for this path."""
    return x1 - (1 - sigma_min) * x0


def cfm_loss(
    velocity: Velocity,
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    sigma_min: float,
    **model_kwargs,
) -> torch.Tensor:
    """Per-sample conditional flow matching loss, shape (B,).

    ``velocity(x_t, t, **model_kwargs)`` is any callable (the network, usually). The caller
    takes the mean; the per-sample values also feed the loss-by-time figure.
    """
    x_t = interpolate(x0, x1, t, sigma_min)  # (B, C, H, W)
    u_t = target_velocity(x0, x1, sigma_min)  # (B, C, H, W)
    v_t = velocity(x_t, t, **model_kwargs)  # (B, C, H, W)
    return (v_t.float() - u_t.float()).pow(2).flatten(1).mean(dim=1)  # (B,)


def _stratified(batch: int, generator: Optional[torch.Generator], device, t_max: float = 1.0) -> torch.Tensor:
    # One uniform offset shared by a batch of evenly spaced times: every batch covers
    # [0, 1) evenly, which lowers the variance of the loss estimate (Kingma et al. 2021,
    # "Variational Diffusion Models", appendix I.1). This is the seed's sampler, which takes
    # the times modulo 1 - 1e-5 (t_max) so that none is 1.
    u = torch.rand(1, generator=generator, device=device)
    return (u + torch.arange(batch, device=device) / batch) % t_max


def _uniform(batch: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=device)


def _logit_normal(
    batch: int, generator: Optional[torch.Generator], device, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    # Esser et al. 2024 ("Scaling Rectified Flow Transformers", eq. 19): more samples in
    # the middle of the path, where the velocity is hardest to predict.
    n = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


TIME_SAMPLERS = {
    "stratified": _stratified,
    "uniform": _uniform,
    "logit_normal": _logit_normal,
}


def sample_time(
    batch: int,
    scheme: str = "stratified",
    *,
    device=None,
    generator: Optional[torch.Generator] = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    t_max: float = 1.0,
) -> torch.Tensor:
    """Training times in [0, t_max), shape (B,), drawn by ``scheme`` (a key of TIME_SAMPLERS):
    stratified times are taken modulo ``t_max``, the others scaled by it."""
    if scheme not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {scheme!r}; choose one of {sorted(TIME_SAMPLERS)}")
    if scheme == "stratified":
        return _stratified(batch, generator, device, t_max)
    if scheme == "logit_normal":
        t = _logit_normal(batch, generator, device, logit_mean, logit_std)
    else:
        t = _uniform(batch, generator, device)
    return t if t_max == 1.0 else t * t_max
