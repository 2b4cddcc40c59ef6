"""The optimizer, its learning-rate schedule, and the check that the weights stayed finite."""

from __future__ import annotations

import math

import torch

__all__ = ["adamw", "all_finite", "fused_ok", "learning_rate"]


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant or a cosine decay to
    ``lr x min_lr_ratio`` at ``total_steps``; a pure function of the step."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, by default with torch's fused kernel: one pass over each parameter instead of
    the default implementation's dozen elementwise ones (docs/performance.md). The two
    round differently in the last bits, so a checkpoint resumes with the implementation it
    was written with: its param groups record it, and loading them restores it."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def fused_ok(accelerator) -> bool:
    """Whether to use the fused AdamW kernel: on CPU and CUDA tensors, but not on FSDP's
    DTensors, where this project has not verified it; those keep torch's default."""
    from accelerate.utils import DistributedType

    return accelerator.device.type in ("cpu", "cuda") and accelerator.distributed_type != DistributedType.FSDP


def all_finite(model) -> bool:
    """Whether every weight is finite; every rank gets the same answer (under FSDP each
    holds shards, so the ranks agree by an all-reduce)."""
    params = list(model.parameters())
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    norms = torch._foreach_norm([p.to_local().detach() if sharded else p.detach() for p in params])
    finite = torch.isfinite(torch.stack(norms)).all().to(torch.int32)
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)
