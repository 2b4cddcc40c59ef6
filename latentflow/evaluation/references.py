"""Reference statistics of real images: a dataset's features, cached beside the latent caches,
and the training and held-out references of a run's data."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..config import DataConfig
from ..data import build_dataset, image_batches, to_uint8
from ..errors import LatentflowError
from .fd import FDStats

__all__ = ["dataset_features", "describe_data", "held_out", "reference_for", "references_for_run", "shipped_references"]


def dataset_features(
    data: DataConfig, net, channels: int, num_images: Optional[int] = None, batch_size: int = 500
) -> Tuple[np.ndarray, np.ndarray]:
    """Features and labels of (the first ``num_images`` of) a dataset's images, read by its
    own rules: bad files stop it in one line, or are left out with ``data.skip_bad_images``."""
    ds = build_dataset(data, channels=channels)
    feats, labels = [], []
    for images, y in image_batches(ds, num_images, batch_size, data.skip_bad_images):
        feats.append(net.run(to_uint8(images))[0])
        labels.append(y.numpy())
    if not feats:
        raise LatentflowError(f"{describe_data(data)} has no usable image; check data.path")
    return np.concatenate(feats), np.concatenate(labels)


def describe_data(data: DataConfig) -> str:
    where = data.path or "bundled"
    first = "" if data.max_items is None else f", {data.max_items} of them"
    return f"{data.source} {where} ({data.split}, {data.image_size} px{first})"


def reference_for(data: DataConfig, net, channels: int, cache_dir: Optional[Path] = None) -> Tuple[FDStats, np.ndarray]:
    """(stats, features) of a dataset, cached beside the latent caches (keyed by the
    dataset's fingerprint and the feature net)."""
    from ..files import atomic_file
    from ..latents import default_cache_dir

    ds = build_dataset(data, channels=channels)
    key = hashlib.sha256(f"{ds.fingerprint()}|{net.identity}|{data.image_size}".encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"features-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                features = f["features"]
            return FDStats.of(features, net.identity, describe_data(data)), features
        except (OSError, ValueError, KeyError):
            pass  # damaged: computed again below
    features, _ = dataset_features(data, net, channels)
    try:
        with atomic_file(path, "feature cache") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features.astype(np.float32))
    except LatentflowError:
        pass  # a cache is a convenience: a read-only cache directory only costs time
    return FDStats.of(features, net.identity, describe_data(data)), features


def held_out(data: DataConfig) -> Optional[DataConfig]:
    """The split of ``data`` a model never trains on, where the source has one."""
    if data.source == "mnist":
        return replace(data, split="test" if data.split == "train" else "train", max_items=None)
    return None


def shipped_references(net) -> Optional[Dict]:
    """The reference statistics that ship beside a digit net (``references.npz``): the
    60 000 MNIST training and 10 000 test digits' feature mean and covariance, and the test
    digits' features; None for a net without them."""
    path = getattr(net, "path", None)
    if path is None or not (Path(path) / "references.npz").is_file():
        return None
    with np.load(Path(path) / "references.npz", allow_pickle=False) as f:
        refs = {k: f[k] for k in f.files}
    if str(refs.get("feature_net", "")) != net.identity:
        raise LatentflowError(
            f"{path}/references.npz was computed with {refs.get('feature_net')}, not with the net "
            f"beside it ({net.identity}); regenerate the asset (experiments/maintainer)"
        )
    return refs


def references_for_run(
    data: DataConfig, net, channels: int, reference: Optional[Path] = None, cache_dir: Optional[Path] = None
) -> List[Dict]:
    """What samples of a model trained on ``data`` are scored against.

    With a digit net that ships its references: the MNIST test and training sets, each with
    the floor of the model's own training data (its images scored against the same
    reference at the same sample size); the test set also carries its features, for
    precision and recall. Otherwise: the training set's statistics (with the held-out split
    as its floor) and the held-out split's (with training images as its floor), computed and
    cached. Or just the ``reference`` file given."""
    if reference is not None:
        stats = FDStats.load(reference)
        return [{"name": Path(reference).stem, "stats": stats, "floor": None}]
    train_cfg = replace(data, split="train") if data.source == "mnist" else data
    shipped = shipped_references(net)
    if shipped is not None:
        _, train_features = reference_for(train_cfg, net, channels, cache_dir)
        floor_of = f"the {len(train_features)} images the model was trained on ({describe_data(train_cfg)})"
        refs = []
        for split, name, what in (
            ("test", "mnist-test", "MNIST test set"),
            ("train", "mnist-train", "MNIST training set"),
        ):
            n = int(shipped[f"{split}_n"])
            stats = FDStats(shipped[f"{split}_mu"], shipped[f"{split}_sigma"], n, net.identity, f"{what} ({n} digits)")
            refs.append({"name": name, "stats": stats, "floor": train_features, "floor_of": floor_of})
        refs[0]["real"] = shipped["test_features"].astype(np.float32)  # precision and recall against these
        return refs
    return _run_data_references(train_cfg, net, channels, cache_dir)


def _run_data_references(train_cfg: DataConfig, net, channels: int, cache_dir: Optional[Path]) -> List[Dict]:
    train_stats, train_features = reference_for(train_cfg, net, channels, cache_dir)
    refs = [{"name": "train", "stats": train_stats, "floor": None}]
    other = held_out(train_cfg)
    if other is not None:
        test_stats, test_features = reference_for(other, net, channels, cache_dir)
        refs[0].update(floor=test_features, floor_of=f"{len(test_features)} held-out images ({other.split} split)")
        # the held-out reference's floor: as many training images as it has
        refs.append(
            {
                "name": "held-out",
                "stats": test_stats,
                "floor": train_features,
                "floor_of": f"{len(train_features)} training images",
            }
        )
    return refs
