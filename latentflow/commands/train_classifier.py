"""``python main.py train-classifier``: train the digit classifier that ``evaluate`` uses as
its feature net, into ``runs/`` (the maintainer script regenerates the shipped one)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..files import check_output
from ..training.classifier import fit_classifier
from . import new_output_dir, say

__all__ = ["main", "train_classifier"]


def train_classifier(
    out: Path,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    overwrite: bool = False,
    replace_shipped: bool = False,
) -> Dict:
    check_output(Path(out), overwrite, directory=True, replace_shipped=replace_shipped)
    info = fit_classifier(out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    say(f"saved {out}: held-out accuracy {info['test_accuracy']:.2%}, trained {info['train_seconds']:.0f} s")
    return info


def main(args) -> None:
    train_classifier(
        new_output_dir("digit-classifier", args.out), epochs=args.epochs, seed=args.seed, overwrite=args.overwrite
    )
