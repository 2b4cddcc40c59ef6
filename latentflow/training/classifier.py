"""Training the classifier net that evaluation uses as its feature space (the shipped digit
net, or one for a user's own labelled data).

The net (``evaluation.features.DigitFeatureNet``) learns to classify 32x32 digits; its
features are the layer before the classifier. No augmentation: shifted, blurred or
thickened digits should look different to it, since those are the faults FD has to see.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..console import Console
from ..evaluation.features import DigitFeatureNet
from ..files import atomic_dir

__all__ = ["digit_features", "fit_digit_net", "save_digit_net"]


def _model_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) images -> float (N, C, H, W) in [-1, 1]; raw 28 px
    MNIST digits are zero-padded to 32 px, as the datasets pad them."""
    x = torch.as_tensor(np.asarray(images))
    x = x[:, None] if x.ndim == 3 else x
    pad = 2 if x.shape[-1] == 28 else 0
    x = x.float() / 127.5 - 1
    return F.pad(x, (pad, pad, pad, pad), value=-1.0) if pad else x


@torch.no_grad()
def digit_features(model: DigitFeatureNet, images: np.ndarray, batch_size: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
    """Features (N, dim) and predicted digits (N,) of uint8 digits."""
    model.eval()
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(_model_images(images[start : start + batch_size]))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def fit_digit_net(
    train: Tuple[np.ndarray, np.ndarray],
    test: Tuple[np.ndarray, np.ndarray],
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    dim: int = 128,
    console: Optional[Console] = None,
    num_classes: int = 10,
) -> Tuple[DigitFeatureNet, Dict]:
    """Train the net on ``train`` (uint8 digits, labels) with AdamW and a cosine schedule;
    returns it with the record ``features.json`` keeps (test accuracy, settings, time)."""
    console = console or Console()
    torch.manual_seed(seed)
    x, y = _model_images(train[0]), torch.as_tensor(train[1]).long()
    batch_size = min(batch_size, len(x))
    model = DigitFeatureNet(width, dim, num_classes, in_channels=x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        _, pred = digit_features(model, test[0])
        console.line(f"classifier: epoch {epoch + 1}/{epochs}, held-out accuracy {(pred == test[1]).mean():.2%}")
    seconds = time.perf_counter() - start
    _, pred = digit_features(model, test[0])
    info = {
        "width": width,
        "dim": dim,
        "num_classes": num_classes,
        "in_channels": int(x.shape[1]),
        "test_accuracy": float((pred == test[1]).mean()),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "train_images": len(x),
        "test_images": len(test[0]),
        "augmentation": "none",
    }
    return model.eval(), info


def save_digit_net(model: DigitFeatureNet, info: Dict, out: Path, references: Optional[Dict] = None) -> Path:
    """Write the net (safetensors + features.json) to ``out``, atomically; with ``references``
    (arrays by name) also ``references.npz``."""
    from safetensors.torch import save_file

    with atomic_dir(Path(out), "digit net") as tmp:
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "features.json").write_text(json.dumps(info, indent=2))
        if references:
            with open(tmp / "references.npz", "wb") as f:
                np.savez_compressed(f, **references)
    return Path(out)
