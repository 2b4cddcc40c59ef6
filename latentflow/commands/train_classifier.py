"""``python main.py train-classifier``: train the classifier net that ``evaluate`` uses as its
feature space, on an experiment's labelled data: MNIST digits (the bundled ones by default;
all 60 000 with ``--set data.path=DIR``), or a folder or npz of any classes, grey or colour,
which gives that data an offline FD and class accuracy (``evaluate --feature-net DIR``). The
shipped digit net and its reference statistics come from
``experiments/maintainer/regenerate_assets.py digits``."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from ..config import DataConfig
from ..data import data_in_colour, train_and_held_out
from ..errors import ConfigError
from ..files import check_output
from ..training.classifier import fit_digit_net, save_digit_net
from . import TERMINAL, experiment, new_output_dir, say

__all__ = ["main", "train_classifier"]

MIN_STEPS = 300  # small datasets get enough epochs for this many steps


def train_classifier(
    out: Path,
    data: Optional[DataConfig] = None,
    epochs: Optional[int] = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    overwrite: bool = False,
    held_out: float = 0.1,
) -> Dict:
    """Train the net on ``data``'s training images and test it on held-out ones (MNIST's
    test split, else a seeded ``held_out`` fraction); ``epochs`` None: 6 for MNIST, else
    enough for about 300 steps."""
    data = data or DataConfig()
    check_output(Path(out), overwrite, directory=True)
    channels = 3 if data_in_colour(data) else 1
    split = train_and_held_out(data, channels, held_out, seed)
    if split.skipped:
        say(split.skipped)
    if split.num_classes < 2:
        raise ConfigError(
            f"train-classifier needs labelled data (class folders, or labels in the npz); {data.path} has "
            f"{split.num_classes} class(es)"
        )
    if epochs is None:
        per_epoch = max(1, len(split.train) // min(batch_size, len(split.train)))
        epochs = 6 if data.source == "mnist" else min(200, max(6, math.ceil(MIN_STEPS / per_epoch)))
    say(f"classifier: {split.about}, {split.num_classes} classes, {epochs} epochs")
    model, info = fit_digit_net(
        (split.train.numpy(), split.train_labels.numpy()),
        (split.held_out.numpy(), split.held_out_labels.numpy()),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        console=TERMINAL,
        num_classes=split.num_classes,
    )
    info.update(train_set=split.about, test_set="held out of the same data")
    if data.source != "mnist":  # what the net knows; evaluate refuses it for other data
        info.update(
            data={**{k: asdict(data)[k] for k in ("source", "path", "image_size")}, "class_names": split.class_names},
            image_size=data.image_size,
        )
    save_digit_net(model, info, out)
    say(
        f"saved {out}: held-out accuracy {info['test_accuracy']:.2%}, trained {info['train_seconds']:.0f} s; "
        f"use it with evaluate --feature-net {out}"
    )
    return info


def main(args) -> None:
    cfg = experiment(args)
    train_classifier(
        new_output_dir(f"{cfg.name}-classifier", args.out),
        cfg.data,
        epochs=args.epochs,
        seed=args.seed,
        overwrite=args.overwrite,
    )
