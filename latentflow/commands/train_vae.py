"""``python main.py train-vae``: train a small MNIST AutoencoderKL like the one latentflow
ships, into ``runs/`` (the maintainer script regenerates the shipped one)."""

from __future__ import annotations

from ..files import check_output
from ..training.vae import VAETrainArgs, fit_vae
from . import TERMINAL, new_output_dir, say

__all__ = ["main", "train_vae"]


def train_vae(args: VAETrainArgs, cpu: bool = False) -> dict:
    """Train and write the VAE that ``args`` describes; print what it reached."""
    check_output(args.out, args.overwrite, directory=True, replace_shipped=args.replace_shipped)
    report = fit_vae(args, cpu, console=TERMINAL)
    m = report["held_out"]
    say(
        f"saved {args.out}: held-out PSNR {m['psnr']:.2f} dB (pooled {m['psnr_pooled']:.2f}), SSIM {m['ssim']:.4f}, "
        f"trained {report['train_seconds'] / 60:.1f} min"
    )
    return report


def main(args) -> None:
    out = new_output_dir("mnist-vae", args.out)
    train_vae(
        VAETrainArgs(
            out=str(out),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            kl_weight=args.kl_weight,
            max_items=args.max_items,
            seed=args.seed,
            overwrite=args.overwrite,
        ),
        cpu=args.cpu,
    )
