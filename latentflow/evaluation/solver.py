"""Solver error: how far a sampler's latents are from the ODE's converged solution for the
same noise and labels. It needs no feature net, and it says how straight the learned field
is, that is, how few steps suffice."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["REFERENCE_TOLERANCE", "converged_latents", "solver_error"]

REFERENCE_TOLERANCE = 1e-6  # dopri5's atol = rtol for the converged solution


def converged_latents(
    pipe,
    labels: Optional[Sequence[int]],
    n: int,
    seed: int,
    cfg_scale: float,
    guidance_interval=None,
    tolerance: float = REFERENCE_TOLERANCE,
    batch_size: int = 500,
):
    """Latents (n, c, h, w) of dopri5 at ``tolerance`` from the noise of ``seed`` (the first
    ``n`` of any draw with that seed), and its NFE."""
    result = pipe.draw(
        None if labels is None else list(labels)[:n],
        n,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        decode=False,
        solver="dopri5",
        atol=tolerance,
        rtol=tolerance,
        cfg_scale=cfg_scale,
        guidance_interval=guidance_interval or [],
    )
    return result.latents, result.nfe


def solver_error(latents: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Root-mean-square and largest per-sample RMS distance between two sets of latents, in
    model units (where the noise has unit variance)."""
    diff = (latents[: len(reference)].double() - reference.double()).flatten(1)  # (n, c*h*w)
    per_sample = diff.pow(2).mean(1).sqrt()
    return {
        "rms": float(diff.pow(2).mean().sqrt()),
        "max_per_sample": float(per_sample.max()),
        "n": int(len(reference)),
    }
