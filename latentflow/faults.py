"""Fault injection for the tests: faults at exact, named moments of a run.

``LATENTFLOW_FAULTS="nonfinite=3,4;nan_weights=9;sigkill=5;sigterm=7;encode_sigkill=2"`` makes
the loss of optimizer-step attempts 3 and 4 non-finite, the weights NaN after optimizer
step 9, sends the process SIGKILL (SIGTERM) once step 5 (7) is done, its checkpoint
included, and SIGKILLs it after it wrote its 2nd latent-cache shard (all counted from 1).

Code under test asks a ``Faults`` object at each moment; with the variable unset the object
is empty and false, so the training loop only pays one truth test per step.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Set

__all__ = ["Faults"]


class Faults:
    def __init__(self, spec: Dict[str, Set[int]]):
        self.spec = spec

    @classmethod
    def from_env(cls) -> Faults:
        spec: Dict[str, Set[int]] = {}
        for part in filter(None, os.environ.get("LATENTFLOW_FAULTS", "").split(";")):
            key, _, values = part.partition("=")
            spec[key.strip()] = {int(v) for v in values.split(",") if v.strip()}
        return cls(spec)

    def __bool__(self) -> bool:
        return bool(self.spec)

    def _due(self, kind: str, n: int) -> bool:
        return n in self.spec.get(kind, ())

    def poison_loss(self, attempt: int) -> bool:
        """Whether optimizer-step attempt ``attempt`` gets a non-finite loss."""
        return self._due("nonfinite", attempt)

    def after_step(self, step: int, model) -> None:
        """Right after optimizer step ``step``: NaN weights where asked."""
        if self._due("nan_weights", step):
            import torch

            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    def after_checkpoint(self, step: int) -> None:
        """Once step ``step`` and its checkpoint (if any) are done: a signal where asked."""
        if self._due("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of the next step

    def after_shard(self, n: int) -> None:
        """After this process wrote its ``n``-th latent-cache shard."""
        if self._due("encode_sigkill", n):
            os.kill(os.getpid(), signal.SIGKILL)
