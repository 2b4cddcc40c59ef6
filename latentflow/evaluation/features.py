"""Feature nets for the Fréchet distance, precision, recall and class accuracy.

``digits``: the digit net latentflow ships (``latentflow/assets/digit-features``), a CNN
trained on all 60 000 MNIST training digits whose 128-d features come from a linear layer
over the whole 4x4 feature map, so they keep where a stroke is (no global pooling); it
ships with the reference statistics of the 60 000 training and 10 000 test digits, so
evaluation needs no dataset. ``digits-pooled``: the earlier digit classifier
(``latentflow/assets/digit-classifier``, 4 500 digits, globally pooled features), kept for
comparison (docs/evaluation.md). ``inception``: the Inception-v3 pool features of FID
(2048-d, through torch-fidelity), when its weights are on this machine. A directory written
by ``train-classifier``: the same kind of net trained on the user's own labelled data (any
classes, colour, size), the offline feature space for data that is not digits. ``auto``
picks the digit net for MNIST data, else Inception, else refuses in one line: FD in a
feature space that does not fit the data measures nothing.
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
    are (a globally pooled map cannot). ``train-classifier`` trains the same net on other
    labelled data: other classes, colour, other sizes (the final map pooled to 4x4).

    (B, 1, 32, 32) -> conv 32 -> pool -> (B, 32, 16, 16) -> conv 64, conv 64 -> pool
    -> (B, 64, 8, 8) -> conv 128 -> pool -> (B, 128, 4, 4) -> linear -> (B, dim)."""

    def __init__(self, width: int = 32, dim: int = 128, num_classes: int = 10, in_channels: int = 1):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(in_channels, width),
            nn.MaxPool2d(2),  # 16 x 16
            *conv(width, 2 * width),
            *conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 8 x 8
            *conv(2 * width, 4 * width),
            nn.MaxPool2d(2),  # 4 x 4
            nn.AdaptiveAvgPool2d(4),  # other image sizes: 4 x 4 too (32 px: no change)
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
        model = DigitFeatureNet(info["width"], info["dim"], info.get("num_classes", 10), info.get("in_channels", 1))
    else:
        info = json.loads((path / "classifier.json").read_text())
        model = DigitClassifier(width=info["width"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval().requires_grad_(False), info


class DigitNet:
    """A classifier net as a feature net: features (N, D) and a class prediction; with the
    reference statistics that ship beside it, where they do (``references.npz``). The shipped
    nets know MNIST digits; one from ``train-classifier`` knows the data it was trained on
    (recorded in its ``features.json``)."""

    def __init__(self, path: Path = DIGIT_FEATURES_DIR):
        self.path = Path(path)
        self.model, self.info = load_classifier(path)
        self.trained_on = self.info.get("data")  # None: MNIST digits (the shipped nets)
        if self.trained_on is None:
            self.name = "digits" if isinstance(self.model, DigitFeatureNet) else "digits-pooled"
        else:
            self.name = "classifier"
        h = hashlib.sha256()
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        self.identity = f"{self.name}@{h.hexdigest()[:16]}"
        self.dim = self.info.get("dim", 128)
        self.in_channels = self.info.get("in_channels", 1)
        self.test_accuracy = self.info["test_accuracy"]

    def why_not(self, data: DataConfig, channels: int, image_size: int) -> str:
        """Why this net's scores would mean nothing on ``data`` ("" when they would not)."""
        mine = self.trained_on
        if mine is None:
            if data.source != "mnist":
                return f"the digit classifier knows only MNIST digits, and this data is {data.source} {data.path}"
            if image_size != 32:
                return f"the digit classifier reads 32 px digits, and this data is {image_size} px"
            return ""
        where = f"the classifier in {self.path} was trained on {mine['source']} {mine['path'] or 'bundled'}"
        if (mine["source"], mine["path"]) != (data.source, data.path):
            return f"{where}, and this data is {data.source} {data.path or 'bundled'}"
        if mine["image_size"] != image_size:
            return f"{where} at {mine['image_size']} px, and this data is {image_size} px"
        if channels != self.in_channels:
            return f"{where} with {self.in_channels} channel(s), and this model makes {channels}"
        names = data.class_names
        if names is not None and mine.get("class_names") and list(names) != mine["class_names"]:
            return f"{where} with classes {mine['class_names']}, and this data has {names}"
        return ""

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, dim), predicted classes (N,)."""
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        if x.shape[1] != self.in_channels:
            x = x.mean(1, keepdim=True) if self.in_channels == 1 else x.expand(-1, self.in_channels, -1, -1)
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


def feature_net(
    choice: str = "auto",
    data: Optional[DataConfig] = None,
    channels: int = 1,
    image_size: int = 32,
    flag: str = "--feature-net",
):
    """The feature net for ``data``: ``digits``, ``digits-pooled``, ``inception``, a directory
    written by ``train-classifier``, or ``auto`` (digits where they fit, else Inception where
    its weights are local). A classifier is refused for data it was not trained on, asked for
    by name or not: its scores would mean nothing there. ``flag`` is what the caller calls
    the choice, for the message."""
    data = data or DataConfig()
    if choice == "inception":
        return InceptionNet()
    if choice not in FEATURE_NETS:
        if not (Path(choice) / "features.json").is_file():
            raise LatentflowError(
                f"{flag} {choice}: not one of {', '.join(FEATURE_NETS)}, nor a directory written by "
                "`python main.py train-classifier`"
            )
        net = DigitNet(Path(choice))
        why = net.why_not(data, channels, image_size)
        if why:
            raise LatentflowError(f"{flag} {choice}: {why}; train one on this data with train-classifier")
        return net
    shipped = DigitNet() if choice != "digits-pooled" else DigitNet(CLASSIFIER_DIR)
    why = shipped.why_not(data, channels, image_size)
    if choice in ("digits", "digits-pooled"):
        if why:
            raise LatentflowError(
                f"{flag} {choice}: {why}, so its FD and accuracy would mean nothing; train a classifier on this "
                f"data (python main.py train-classifier --set data.path=...) and pass {flag} DIR, or use {flag} "
                f"inception with {INCEPTION_WEIGHTS} in {InceptionNet.weights_path().parent}"
            )
        return shipped
    if not why:
        return shipped
    if InceptionNet.weights_path().is_file():
        return InceptionNet()
    raise LatentflowError(
        f"no feature net fits this data: {why}; train one on it (python main.py train-classifier --set "
        f"data.path=...) and pass {flag} DIR, or put {INCEPTION_WEIGHTS} in {InceptionNet.weights_path().parent} "
        "(copy it there from a connected machine)"
    )
