"""``python main.py train-vae``: train an AutoencoderKL for an experiment's data (MNIST, an
npz, a folder; grey or colour), for use as ``vae.pretrained``."""

from __future__ import annotations

from ..training.vae import VAEOptions, train_autoencoder
from . import TERMINAL, experiment, say

__all__ = ["main", "train_vae"]

SHORTCUTS = {  # earlier flags, kept as shortcuts for --set
    "epochs": "autoencoder.epochs",
    "batch_size": "autoencoder.batch_size",
    "lr": "autoencoder.lr",
    "kl_weight": "autoencoder.kl_weight",
    "max_items": "data.max_items",
    "seed": "train.seed",
}


def train_vae(cfg, options: VAEOptions) -> dict:
    """Train and write the VAE; print what it reached and how to use it."""
    report = train_autoencoder(cfg, options, console=TERMINAL)
    m = report["held_out"]
    say(
        f"saved {report['out']}: held-out PSNR {m['psnr']:.2f} dB (pooled {m['psnr_pooled']:.2f}), SSIM "
        f"{m['ssim']:.4f}, trained {report['train_seconds'] / 60:.1f} min; train a flow on it with "
        f"--set vae.pretrained={report['out']}"
    )
    return report


def main(args) -> None:
    overrides = list(args.overrides)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    args.overrides = overrides
    options = VAEOptions(
        output_dir=args.output_dir,
        resume=args.resume,
        out=args.out,
        cpu=args.cpu,
        overrides=tuple(overrides),
        argv=tuple(args.argv),
        overwrite=args.overwrite,
    )
    train_vae(experiment(args), options)
