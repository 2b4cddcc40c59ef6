"""A small digit classifier: the feature space for the Fréchet distance and the judge of
class accuracy. ``python main.py train-classifier`` trains it on the bundled training
digits and ships it in ``latentflow/assets/digit-classifier`` (safetensors + JSON).

Its 128-d penultimate features (after global average pooling) play the role Inception's
pool features play in FID: a compact space where real digits cluster by class and style.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .config import DataConfig
from .data import build_dataset
from .errors import LatentflowError

__all__ = ["DigitClassifier", "CLASSIFIER_DIR", "load_classifier", "train_classifier"]

CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "digit-classifier"


class DigitClassifier(nn.Module):
    """32x32 gray images in [-1, 1] -> logits over 10 digits; ``features`` gives 128-d."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(1, width), nn.MaxPool2d(2),  # 16 x 16
            block(width, 2 * width), nn.MaxPool2d(2),  # 8 x 8
            block(2 * width, 4 * width),  # 8 x 8, 128 channels
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10)


def load_classifier(path: Path = CLASSIFIER_DIR) -> Tuple[DigitClassifier, Dict]:
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise LatentflowError(f"no digit classifier in {path}; train one with `python main.py train-classifier --out {path}`")
    info = json.loads((path / "classifier.json").read_text())
    model = DigitClassifier(width=info["width"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval().requires_grad_(False), info


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


def train_classifier(out: Path, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     overwrite: bool = False, replace_shipped: bool = False) -> Dict:
    out = Path(out)
    from .runtime import check_output

    check_output(out, overwrite, replace_shipped, directory=True)
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
    for epoch in range(epochs):
        model.train()
        for x, y, _ in loader:
            loss = F.cross_entropy(model(_shift(x, gen)), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    acc = _accuracy(model, test_x, test_set.labels)
    info = {"width": 32, "test_accuracy": acc, "test_set": "bundled MNIST test split (500 digits)",
            "train_set": "bundled MNIST train split (4500 digits), random shifts of up to 2 px",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "train_seconds": round(seconds, 1)}
    from .runtime import atomic_dir

    with atomic_dir(out, "classifier") as tmp:
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "classifier.json").write_text(json.dumps(info, indent=2))
    print(f"saved {out}: held-out accuracy {acc:.2%}, trained {seconds:.0f} s")
    return info
