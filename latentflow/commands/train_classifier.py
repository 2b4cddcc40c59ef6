"""``python main.py train-classifier``: train the digit net that ``evaluate`` uses as its
feature space, on an experiment's digits (the bundled ones by default; all 60 000 with
``--set data.path=DIR``), into ``runs/``. The shipped net and its reference statistics come
from ``experiments/maintainer/regenerate_assets.py digits``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from ..config import DataConfig
from ..data import build_dataset
from ..errors import ConfigError
from ..evaluation.references import held_out
from ..files import check_output
from ..training.classifier import fit_digit_net, save_digit_net
from . import TERMINAL, experiment, new_output_dir, say

__all__ = ["main", "train_classifier"]


def train_classifier(
    out: Path,
    data: Optional[DataConfig] = None,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    overwrite: bool = False,
) -> Dict:
    """Train the digit net on ``data``'s training split, test it on the held-out split."""
    data = replace(data or DataConfig(), split="train")
    test_cfg = held_out(data)
    if data.source != "mnist" or test_cfg is None:
        raise ConfigError(f"train-classifier trains on MNIST digits; data.source is {data.source!r}")
    check_output(Path(out), overwrite, directory=True)
    train, test = build_dataset(data, channels=1), build_dataset(test_cfg, channels=1)
    model, info = fit_digit_net(
        (train.images.numpy(), train.labels.numpy()),
        (test.images.numpy(), test.labels.numpy()),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        console=TERMINAL,
    )
    info.update(train_set=train.origin, test_set=test.origin)
    save_digit_net(model, info, out)
    say(f"saved {out}: held-out accuracy {info['test_accuracy']:.2%}, trained {info['train_seconds']:.0f} s")
    return info


def main(args) -> None:
    cfg = experiment(args)
    train_classifier(
        new_output_dir("digit-net", args.out), cfg.data, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite
    )
