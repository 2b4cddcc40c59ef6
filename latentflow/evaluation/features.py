"""Feature nets for the Fréchet distance, precision, recall and class accuracy.

``digits``: the digit net latentflow ships (``latentflow/assets/digit-features``), a CNN
trained on all 60 000 MNIST training digits whose 128-d features come from a linear layer
over the whole 4x4 feature map, so they keep where a stroke is (no global pooling); it
ships with the reference statistics of the 60 000 training and 10 000 test digits, so
evaluation needs no dataset. ``digits-pooled``: the earlier digit classifier
(``latentflow/assets/digit-classifier``, 4 500 digits, globally pooled features), kept for
comparison (docs/evaluation.md). ``inception``: the Inception-v3 pool features of FID
(2048-d, through torch-fidelity), when its weights are on this machine. ``auto`` picks the
digit net for MNIST data, else Inception, else refuses in one line: FD in a feature space
that does not fit the data measures nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..config import DataConfig
from ..errors import LatentflowError

__all__ = [
    "CLASSIFIER_DIR",
    "DIGIT_FEATURES_DIR",
    "FEATURE_NETS",
    "INCEPTION_WEIGHTS",
    "DigitClassifier",
    "DigitFeatureNet",
    "DigitNet",
    "InceptionNet",
    "feature_net",
    "load_classifier",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGIT_FEATURES_DIR = ASSETS / "digit-features"  # the digit net evaluation uses
CLASSIFIER_DIR = ASSETS / "digit-classifier"  # the earlier, globally pooled one
FEATURE_NETS = ("auto", "digits", "digits-pooled", "inception")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class DigitClassifier(nn.Module):
    """The earlier digit classifier: 32x32 gray images in [-1, 1] -> logits over 10 digits;
    ``features`` gives 128-d after global average pooling, blind to where strokes are."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(1, width),
            nn.MaxPool2d(2),  # 16 x 16
            block(width, 2 * width),
            nn.MaxPool2d(2),  # 8 x 8
            block(2 * width, 4 * width),  # 8 x 8, 128 channels
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10)


class DigitFeatureNet(nn.Module):
    """32x32 gray images in [-1, 1] -> logits over 10 digits; ``features`` gives ``dim``-d
    features from a linear layer over the whole final 4x4 map, so that they see where strokes
    are (a globally pooled map cannot).

    (B, 1, 32, 32) -> conv 32 -> pool -> (B, 32, 16, 16) -> conv 64, conv 64 -> pool
    -> (B, 64, 8, 8) -> conv 128 -> pool -> (B, 128, 4, 4) -> linear -> (B, dim)."""

    def __init__(self, width: int = 32, dim: int = 128, num_classes: int = 10):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(1, width),
            nn.MaxPool2d(2),  # 16 x 16
            *conv(width, 2 * width),
            *conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 8 x 8
            *conv(2 * width, 4 * width),
            nn.MaxPool2d(2),  # 4 x 4
        )
        self.project = nn.Linear(4 * width * 16, dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.body(x).flatten(1))  # (B, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10)


def load_classifier(path: Path = DIGIT_FEATURES_DIR) -> Tuple[nn.Module, Dict]:
    """A shipped (or trained) digit net and what its JSON records: ``features.json`` for the
    spatial net, ``classifier.json`` for the earlier pooled one."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise LatentflowError(f"no digit net in {path}; train one with `python main.py train-classifier --out {path}`")
    if (path / "features.json").is_file():
        info = json.loads((path / "features.json").read_text())
        model = DigitFeatureNet(width=info["width"], dim=info["dim"])
    else:
        info = json.loads((path / "classifier.json").read_text())
        model = DigitClassifier(width=info["width"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval().requires_grad_(False), info


class DigitNet:
    """A digit net as a feature net: features (N, D) and a 10-way prediction; with the
    reference statistics that ship beside it, where they do (``references.npz``)."""

    def __init__(self, path: Path = DIGIT_FEATURES_DIR):
        self.path = Path(path)
        self.model, self.info = load_classifier(path)
        self.name = "digits" if isinstance(self.model, DigitFeatureNet) else "digits-pooled"
        h = hashlib.sha256()
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        self.identity = f"{self.name}@{h.hexdigest()[:16]}"
        self.dim = self.info.get("dim", 128)
        self.test_accuracy = self.info["test_accuracy"]

    @staticmethod
    def why_not(data: DataConfig, channels: int, image_size: int) -> str:
        if data.source != "mnist":
            return f"the digit classifier knows only MNIST digits, and this data is {data.source} {data.path}"
        if image_size != 32:
            return f"the digit classifier reads 32 px digits, and this data is {image_size} px"
        return ""

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, 128), predicted digits (N,)."""
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        feats, preds = [], []
        for i in range(0, len(x), batch_size):
            f = self.model.features(x[i : i + batch_size])
            feats.append(f)
            preds.append(self.model.head(f).argmax(1))
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()


class InceptionNet:
    """Inception-v3 pool features (2048-d), the space of FID, through torch-fidelity."""

    name = "inception"

    def __init__(self):
        path = self.weights_path()
        if not path.is_file():
            raise LatentflowError(
                f"Inception features need {INCEPTION_WEIGHTS} in {path.parent} (torch-fidelity's FID weights); "
                "copy it there from a connected machine"
            )
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        ).eval()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.identity, self.dim = f"inception-v3@{digest}", 2048

    @staticmethod
    def weights_path() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 100) -> Tuple[np.ndarray, None]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, C, H, W)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        feats = [self.model(x[i : i + batch_size].contiguous())[0] for i in range(0, len(x), batch_size)]
        return torch.cat(feats).numpy(), None


def feature_net(choice: str = "auto", data: Optional[DataConfig] = None, channels: int = 1, image_size: int = 32):
    """The feature net for ``data``: ``digits``, ``digits-pooled``, ``inception``, or ``auto``
    (digits where they fit, else Inception where its weights are local, else a one-line
    refusal)."""
    if choice == "digits":
        return DigitNet()
    if choice == "digits-pooled":
        return DigitNet(CLASSIFIER_DIR)
    if choice == "inception":
        return InceptionNet()
    why = DigitNet.why_not(data or DataConfig(), channels, image_size)
    if not why:
        return DigitNet()
    if InceptionNet.weights_path().is_file():
        return InceptionNet()
    raise LatentflowError(
        f"no feature net fits this data: {why}; Inception features need {INCEPTION_WEIGHTS} in "
        f"{InceptionNet.weights_path().parent} (copy it there), or pass --feature-net digits to use the digit "
        "classifier anyway"
    )
