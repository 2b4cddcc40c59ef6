"""ODE solvers for ``dx/dt = velocity(x, t)`` from ``t0`` to ``t1`` (``t = 0`` noise,
``t = 1`` data; see ``flow.py``).

Fixed-step Runge-Kutta methods (euler, midpoint, heun, rk4) and adaptive Dormand-Prince
(dopri5, through torchdiffeq). Every call counts the exact number of velocity evaluations
(NFE) by wrapping the callable, so the count is measured, never computed from a formula.

``meanflow`` is not an ODE solver: it jumps with a model's *average* velocity (see
``flow.py``), ``x <- x + h · u(x, t, t + h)``, one evaluation per step; its ``velocity``
takes the end time as a third argument.

Pure math: ``velocity`` is any callable taking ``x`` of shape (B, ...) and ``t`` of shape
(B,) (and, for meanflow, the end time of shape (B,)). No modules, devices or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch

__all__ = ["FIXED_STEP_SOLVERS", "ODE_SOLVERS", "SOLVERS", "ODEResult", "integrate", "nfe_per_step"]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ODEResult:
    x: torch.Tensor  # the state at t1
    nfe: int  # velocity evaluations actually made
    trajectory: List[torch.Tensor] = field(default_factory=list)  # states at `times`, if kept
    times: List[float] = field(default_factory=list)


class _Counted:
    """Wraps a velocity so that every evaluation is counted and ``t`` is a (B,) tensor."""

    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor, end=None) -> torch.Tensor:
        self.nfe += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        if end is None:
            return self.velocity(x, t)
        return self.velocity(x, t, torch.as_tensor(end, dtype=x.dtype, device=x.device).expand(x.shape[0]))


# One step of each fixed-step method: (f, x, t, h) -> x at t + h.
def _euler(f, x, t, h):
    return x + h * f(x, t)


def _midpoint(f, x, t, h):
    k1 = f(x, t)
    return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)


def _heun(f, x, t, h):
    # Explicit trapezoid (Heun's method): second order, two evaluations per step.
    k1 = f(x, t)
    k2 = f(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f, x, t, h):
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


def _jump(f, x, t, h):
    # an average-velocity model: the whole interval in one evaluation
    return x + h * f(x, t, t + h)


FIXED_STEP_SOLVERS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4}
ODE_SOLVERS = (*FIXED_STEP_SOLVERS, "dopri5")
SOLVERS = (*ODE_SOLVERS, "meanflow")
_STEPS = {**FIXED_STEP_SOLVERS, "meanflow": _jump}

_EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "meanflow": 1}


def nfe_per_step(solver: str) -> int:
    """Velocity evaluations per step of a fixed-step solver (for planning, not reporting)."""
    return _EVALS_PER_STEP[solver]


@torch.no_grad()
def integrate(
    velocity: Velocity,
    x0: torch.Tensor,
    solver: str = "heun",
    steps: int = 10,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    keep_trajectory: bool = False,
) -> ODEResult:
    """Integrate from ``x0`` at ``t0`` to ``t1``.

    Fixed-step solvers take ``steps`` equal steps; dopri5 ignores ``steps`` and adapts its
    step to ``atol``/``rtol`` (its trajectory, if kept, is at ``steps + 1`` evenly spaced
    times).
    """
    f = _Counted(velocity)
    if solver in _STEPS:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        step = _STEPS[solver]
        h = (t1 - t0) / steps
        x, times, traj = x0, [t0], [x0] if keep_trajectory else []
        for i in range(steps):
            t = t0 + i * h
            x = step(f, x, t, h)
            if keep_trajectory:
                traj.append(x)
                times.append(t + h)
        return ODEResult(x=x, nfe=f.nfe, trajectory=traj, times=times if keep_trajectory else [])
    if solver == "dopri5":
        from torchdiffeq import odeint

        n_out = steps + 1 if keep_trajectory else 2
        ts = torch.linspace(t0, t1, n_out, dtype=torch.float64)
        # torchdiffeq calls func(t, x) with a scalar t; keep the time grid in float64 so
        # the step-size controller is not limited by the state's (maybe low) precision.
        out = odeint(lambda t, x: f(x, t), x0, ts.to(x0.device), method="dopri5", atol=atol, rtol=rtol)
        traj = list(out) if keep_trajectory else []
        return ODEResult(x=out[-1], nfe=f.nfe, trajectory=traj, times=ts.tolist() if keep_trajectory else [])
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
