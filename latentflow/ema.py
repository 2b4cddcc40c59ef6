"""Exponential moving average of model weights, used for sampling and export."""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ["EMA"]


def _is_sharded(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor"


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if _is_sharded(p) else p


class EMA:
    """Keeps ``self.model``, a frozen copy whose weights track the trained model's.

    The decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a
    short run is not dominated by the random initialisation.

    When training shards the model (FSDP: its parameters are DTensors), each rank keeps and
    updates only its own shards of the average, with no communication per step;
    ``materialize()`` gathers them into ``self.model`` when the full weights are needed (a
    grid, a checkpoint, the export). It is a collective then: every rank calls it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._shards: Optional[List[torch.Tensor]] = None  # this rank's shards, when sharded
        self._layout: List = []

    def track(self, trained: nn.Module) -> EMA:
        """Follow ``trained`` (the model as prepared); shard the average like it if it is sharded."""
        params = list(trained.parameters())
        if any(_is_sharded(p) for p in params):
            self._layout = [
                (p.device_mesh, p.placements, p.shape, p.stride()) if _is_sharded(p) else None for p in params
            ]
            self._shards = [_local(p).detach().clone() for p in params]
        return self

    @torch.no_grad()
    def update(self, trained: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        target = self._shards if self._shards is not None else list(self.model.parameters())
        source = [_local(p).detach() for p in trained.parameters()]
        torch._foreach_lerp_(target, source, 1.0 - d)  # ema += (1 - d) (p - ema)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """``self.model`` with the current average (a collective when sharded)."""
        if self._shards is not None:
            from torch.distributed.tensor import DTensor

            for p, shard, layout in zip(self.model.parameters(), self._shards, self._layout):
                if layout is None:
                    p.copy_(shard)
                else:
                    mesh, placements, shape, stride = layout
                    p.copy_(DTensor.from_local(shard, mesh, placements, shape=shape, stride=stride).full_tensor())
        return self.model

    def state_dict(self) -> dict:
        return self.materialize().state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict, updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
        if self._shards is not None:
            from torch.distributed.tensor import distribute_tensor

            for i, (p, layout) in enumerate(zip(self.model.parameters(), self._layout)):
                if layout is None:
                    self._shards[i].copy_(p)
                else:
                    mesh, placements, _, _ = layout
                    self._shards[i].copy_(
                        distribute_tensor(p.detach().to(self._shards[i].device), mesh, placements).to_local()
                    )
