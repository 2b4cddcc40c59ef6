"""Random streams: every random draw of training comes from a generator reseeded for each
(seed, purpose, rank, epoch, iteration, micro-batch) with ``derive_seed``.

The noise, the times, the label dropout and the posterior sample of a step are thus a pure
function of where the step is, on which rank. Ranks draw different noise while they
initialise identical weights (the model is built from ``seed`` alone), and a resumed run
draws exactly what the uninterrupted run drew without storing generator states. The
global generators (torch, CUDA, Python, numpy) are saved and restored as well, for any code
that uses them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = [
    "STREAM_DATA",
    "STREAM_FLIP",
    "STREAM_TRAIN",
    "STREAM_VALID",
    "RankRNG",
    "derive_seed",
    "get_rng_state",
    "set_rng_state",
]

# Stream purposes, the second key of derive_seed, so that no two uses share a stream.
STREAM_TRAIN, STREAM_DATA, STREAM_VALID, STREAM_FLIP = 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (numpy's SeedSequence hash):
    distinct keys give unrelated streams, equal keys the same stream."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class RankRNG:
    """The training-loop generator of one rank, reseeded for each micro-batch."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=device)

    def at(self, epoch: int, iteration: int, micro: int = 0) -> torch.Generator:
        return self.generator.manual_seed(derive_seed(self.seed, STREAM_TRAIN, self.rank, epoch, iteration, micro))


def get_rng_state() -> dict:
    """This process's global generator states, as tensors and numbers that
    ``torch.load(weights_only=True)`` reads back."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
