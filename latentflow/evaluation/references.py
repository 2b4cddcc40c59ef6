"""Reference statistics of real images: a dataset's features, cached beside the latent caches,
and the training and held-out references of a run's data."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import DataConfig
from ..data import build_dataset, to_uint8
from ..errors import LatentflowError
from .fd import FDStats

__all__ = ["dataset_features", "describe_data", "held_out", "reference_for", "references_for_run"]


def dataset_features(
    data: DataConfig, net, channels: int, num_images: Optional[int] = None, batch_size: int = 500
) -> Tuple[np.ndarray, np.ndarray]:
    """Features and labels of (the first ``num_images`` of) a dataset's images."""
    ds = build_dataset(data, channels=channels)
    n = len(ds) if num_images is None else min(num_images, len(ds))
    feats = []
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        bad = [(ds.files[it[2]], it[3]) for it in items if len(it) > 3 and it[3]]
        if bad:
            raise LatentflowError(f"{bad[0][0]}: {bad[0][1]}; fix or remove it")
        feats.append(net.run(to_uint8(torch.stack([it[0] for it in items])))[0])
    return np.concatenate(feats), ds.labels[:n].numpy()


def describe_data(data: DataConfig) -> str:
    where = data.path or "bundled"
    first = "" if data.max_items is None else f", first {data.max_items}"
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


def references_for_run(
    data: DataConfig, net, channels: int, reference: Optional[Path] = None, cache_dir: Optional[Path] = None
) -> List[Dict]:
    """The training-set reference (with the held-out split as its floor) and the held-out
    reference (with training images as its floor), or the ``reference`` file given."""
    if reference is not None:
        stats = FDStats.load(reference)
        return [{"name": Path(reference).stem, "stats": stats, "floor": None}]
    train_cfg = replace(data, split="train") if data.source == "mnist" else data
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
