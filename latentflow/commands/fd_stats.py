"""``python main.py fd-stats``: reference statistics (mean and covariance of features) of a
dataset, for ``evaluate --reference``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import DataConfig
from ..files import check_output
from . import data_section, experiment, new_output_dir, say

__all__ = ["fd_stats", "main"]


def fd_stats(
    data: DataConfig,
    out: Path,
    num_images: Optional[int] = None,
    choice: str = "auto",
    channels: int = 1,
    overwrite: bool = False,
) -> str:
    """Write the FD statistics of (the first ``num_images`` of) ``data`` to ``out``."""
    from ..evaluation import FDStats, dataset_features, describe_data, feature_net

    check_output(Path(out), overwrite)
    net = feature_net(choice, data, channels, data.image_size)
    features, _ = dataset_features(data, net, channels, num_images)
    stats = FDStats.of(features, net.identity, describe_data(data))
    stats.save(out)
    return f"FD statistics of {stats.n} images of {stats.description} ({net.identity}, {net.dim}-d) -> {out}"


def main(args) -> None:
    from ..vae import FrozenVAE

    cfg = experiment(args)
    data = data_section(cfg.data, args.data)
    channels = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).in_channels
    out = args.out or new_output_dir("fd-stats", None) / f"{data.source}-{data.split}.npz"
    say(fd_stats(data, out, args.num_images, args.feature_net, channels, args.overwrite))
