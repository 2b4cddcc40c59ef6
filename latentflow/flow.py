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

**Average velocity (MeanFlow, Geng et al. 2025, arXiv 2505.13447), in this convention.** A
model that jumps learns, for a point ``z`` at time ``r`` on an ODE trajectory and a later
time ``t >= r``, the average velocity over the interval::

    u(z_r, r, t) = 1/(t - r) ∫_r^t v(z_τ, τ) dτ,      so that   z_t = z_r + (t - r) u(z_r, r, t)

and ``u(z, r, r) = v(z, r)``. Multiply by ``t - r`` and differentiate in ``r`` along the
trajectory (``dz_r/dr = v``, ``t`` fixed): ``-u + (t - r) du/dr = -v``, that is::

    u(z_r, r, t) = v(z_r, r) + (t - r) · d/dr u(z_r, r, t),
    d/dr u = v · ∂_z u + ∂_r u                                  (one Jacobian-vector product)

(or, to first order in a small step ε, ``(u(z + ε v, r + ε, t) - u(z, r, t)) / ε``: two
ordinary forward passes, cheaper than a forward-mode one on a CPU).

The training target replaces ``v`` by the conditional velocity ``x1 - (1 - σ_min) x0`` (as
CFM does) and takes ``d/dr u`` from the network itself, with the gradient stopped; at
``r = t`` it is exactly the CFM target. The direction ``z`` moves in that derivative (the
tangent) is either the same conditional velocity (the original MeanFlow) or the network's own
instantaneous velocity ``u(z, r, r)`` (improved MeanFlow, Geng et al. 2025, arXiv
2512.02012): the marginal velocity the identity asks for, estimated by the model rather than
by one noisy pair. The improved paper writes the loss as a regression of the conditional
velocity by ``V = u - (t - r) sg(d/dr u)``, a target that depends on the data alone; its
gradient is that of ``u`` against ``v + (t - r) sg(d/dr u)``, so the one loss below serves
both. (The papers integrate from data at 0 to noise at 1, so their identity reads
``u = v - (t - r) d/dt u``; here the point moves forward in time.)
Sampling in N jumps: ``z <- z + (t_k+1 - t_k) u(z, t_k, t_k+1)``.

Everything here is pure tensor math: no modules, devices or files.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = [
    "TIME_SAMPLERS",
    "broadcast_time",
    "cfm_loss",
    "difference_derivative",
    "interpolate",
    "meanflow_loss",
    "meanflow_target",
    "sample_time",
    "sample_two_times",
    "target_velocity",
    "time_derivative",
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


# --- average velocity (MeanFlow) ---------------------------------------------------------


def sample_two_times(
    batch: int,
    equal_share: float,
    max_gap: float = 1.0,
    *,
    jump_share: float = 0.0,
    jump_steps: Sequence[int] = (1, 2),
    device=None,
    generator: Optional[torch.Generator] = None,
    **time_kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``r <= t`` (each (B,)): two times from ``sample_time(**time_kwargs)``, ordered;
    each pair has ``r = t`` (plain flow matching) with probability ``equal_share``, and no
    gap exceeds ``max_gap`` (a curriculum widens it from 0 to 1).

    With ``jump_share`` > 0, that share of the pairs with ``r < t`` is moved onto the
    intervals a sampler of N jumps visits, ``(k/N, (k+1)/N)`` with N drawn from
    ``jump_steps`` and k from 0..N-1: the corner (0, 1) that one jump asks for is otherwise
    almost never drawn."""
    a = sample_time(batch, device=device, generator=generator, **time_kwargs)
    b = sample_time(batch, device=device, generator=generator, **time_kwargs)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    equal = torch.rand(batch, device=device, generator=generator) < equal_share
    if jump_share > 0:  # drawn only when asked for, so earlier runs keep their random streams
        jump = ~equal & (torch.rand(batch, device=device, generator=generator) < jump_share)
        n = torch.tensor(list(jump_steps), device=device, dtype=r.dtype)
        n = n[torch.randint(len(n), (batch,), device=device, generator=generator)]  # (B,) jumps
        k = torch.floor(torch.rand(batch, device=device, generator=generator) * n)  # (B,) which one
        r, t = torch.where(jump, k / n, r), torch.where(jump, (k + 1) / n, t)
    t = torch.where(equal, r, torch.minimum(t, r + max_gap))
    return r, t


def time_derivative(average: Velocity, z: torch.Tensor, r: torch.Tensor, dz: torch.Tensor):
    """``(u, d/dr u)`` for ``u = average(z, r)``, moving ``z`` along ``dz`` and ``r`` at unit
    speed: one forward pass with forward-mode autodiff. ``u`` keeps its graph for the
    backward pass (so hooks of a wrapped module, DDP's included, see one ordinary forward);
    the derivative is returned detached."""
    import warnings

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), warnings.catch_warnings():
        # torch loads its forward-mode rules through torch.jit.script once, with a warning
        warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
        out = average(fwAD.make_dual(z, dz), fwAD.make_dual(r, torch.ones_like(r)))
        u, dudr = fwAD.unpack_dual(out)
    return u, dudr.detach()


DIFFERENCE_STEP = 1e-3
"""The step of ``difference_derivative``, taken in float32: its rounding error is about
1e-7 / 1e-3 = 1e-4 of ``u`` and its truncation error of order 1e-3, both far below the noise
of one pair's target."""


def difference_derivative(
    average: Velocity, z: torch.Tensor, r: torch.Tensor, dz: torch.Tensor, exact: Optional[Velocity] = None
):
    """``(u, d/dr u)`` as ``time_derivative`` gives them, the derivative by a forward
    difference instead: ``(u(z + ε dz, r + ε) - u(z, r)) / ε`` with ε = ``DIFFERENCE_STEP``.
    Plain forward passes in place of one forward-mode pass, which costs over three
    (``docs/meanflow.md``).

    The two ends must be computed in float32 or wider: in bf16 they agree to about three
    digits, and their difference over ε would be noise. Where ``average`` computes in a lower
    precision, ``exact`` is the same function in float32, and both ends come from it without
    gradient; otherwise ``u`` is one end and one more pass of ``average`` the other. ``u``
    keeps its graph; the derivative carries none.

    The step is forward in r with the end time held, so the moved point's gap is
    ``t - r - ε``: below 0 only for pairs closer than ε, whose target weighs the derivative by
    ``t - r < ε`` (by 0 where r = t). A backward step would instead leave [0, 1] in r for
    every pair with r < ε, whatever its gap."""
    u = average(z, r)
    wide = torch.promote_types(z.dtype, torch.float32)
    moved = z + DIFFERENCE_STEP * dz, r + DIFFERENCE_STEP
    with torch.no_grad():
        start, end = (u.detach(), average(*moved)) if exact is None else (exact(z, r), exact(*moved))
    return u, (end.to(wide) - start.to(wide)) / DIFFERENCE_STEP


def meanflow_target(v: torch.Tensor, dudr: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The average velocity the identity implies: ``v + (t - r) d/dr u``."""
    return v + broadcast_time((t - r).to(v.dtype), v) * dudr


def meanflow_loss(
    average: Velocity,
    x0: torch.Tensor,
    x1: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    sigma_min: float,
    *,
    v: Optional[torch.Tensor] = None,
    tangent: Optional[torch.Tensor] = None,
    power: float = 1.0,
    eps: float = 1e-3,
    derivative: bool = True,
    difference: bool = False,
    exact: Optional[Velocity] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MeanFlow loss and plain squared error, each (B,).

    ``average(z, r, t)`` is the network's average velocity. ``v`` is the velocity that moves
    ``z`` (default: the conditional ``x1 - (1 - σ_min) x0``; a guided one for classifier-free
    guidance folded into training). ``tangent`` is the direction ``z`` moves in ``d/dr u``
    (default: ``v``; the network's own velocity for improved MeanFlow, computed by the caller
    without gradient). The target ``v + (t - r) d/dr u`` carries no gradient; ``d/dr u`` comes
    from one forward-mode pass, or with ``difference=True`` from a forward difference
    (``difference_derivative``, with ``exact(z, r, t)`` the average in float32 where
    ``average`` computes in a lower precision); with ``derivative=False``, for batches whose every pair has
    ``r = t``, the target is ``v`` and neither runs. The loss is the squared error weighted by
    ``1 / (error + eps)^power`` (the paper's adaptive weighting, also without gradient;
    ``power = 0``: plain MSE).
    """
    z = interpolate(x0, x1, r, sigma_min)  # (B, C, H, W) the point at time r
    v = target_velocity(x0, x1, sigma_min) if v is None else v
    if not derivative:  # every r = t: the target is v itself
        u, target = average(z, r, t), v.float()
    else:
        dz = v if tangent is None else tangent
        at_t = lambda f: None if f is None else (lambda z_, r_: f(z_, r_, t))
        if difference:
            u, dudr = difference_derivative(at_t(average), z, r, dz.to(z.dtype), at_t(exact))
        else:
            u, dudr = time_derivative(at_t(average), z, r, dz.to(z.dtype))
        target = meanflow_target(v.float(), dudr.float(), r, t)
    error = (u.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = (error.detach() + eps).pow(-power) if power else torch.ones_like(error)
    return weight * error, error
