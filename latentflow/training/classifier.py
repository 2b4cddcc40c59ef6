"""Training the digit classifier that evaluation uses as its feature net (on the bundled
training digits, with random shifts of up to 2 px)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import DataConfig
from ..data import build_dataset
from ..evaluation.features import DigitClassifier
from ..files import atomic_dir

__all__ = ["fit_classifier"]


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (background is -1)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


@torch.no_grad()
def _accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(images[i : i + 500]) for i in range(0, len(images), 500)])
    return (logits.argmax(1) == labels).float().mean().item()


def fit_classifier(out: Path, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> Dict:
    """Train the classifier and write it to ``out`` (safetensors + classifier.json, atomically);
    returns what classifier.json records."""
    torch.manual_seed(seed)
    train_set = build_dataset(DataConfig(), channels=1)
    test_set = build_dataset(DataConfig(split="test"), channels=1)
    test_x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y, _ in loader:
            loss = F.cross_entropy(model(_shift(x, gen)), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    acc = _accuracy(model, test_x, test_set.labels)
    info = {
        "width": 32,
        "test_accuracy": acc,
        "test_set": "bundled MNIST test split (500 digits)",
        "train_set": "bundled MNIST train split (4500 digits), random shifts of up to 2 px",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(seconds, 1),
    }
    from safetensors.torch import save_file

    with atomic_dir(Path(out), "classifier") as tmp:
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "classifier.json").write_text(json.dumps(info, indent=2))
    return info
