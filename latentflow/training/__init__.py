"""Training: the flow-matching loop and what it needs (setup, state, checkpoints, objective,
optimizer, progress figures, trackers), and the small trainers of the VAE and the digit
classifier that latentflow ships.

The loop is ``loop.train``; ``latentflow.train`` (the command's Python form) calls it with a
console for its messages.
"""

from .loop import train
from .state import Interrupted, RunOptions, Trainer, TrainState

__all__ = ["Interrupted", "RunOptions", "TrainState", "Trainer", "train"]
