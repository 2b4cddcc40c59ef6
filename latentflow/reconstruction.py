"""Reconstruction sanity check: does the VAE embed these images faithfully?

Encodes images (posterior mean), decodes them, and reports PSNR, SSIM and the mean/std of
the latents after scaling (a well-scaled VAE gives roughly 0 and 1). Writes an original /
reconstruction / |difference| figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from .config import DataConfig
from .data import build_dataset, image_batches, to_uint8
from .errors import DataError
from .figures import save_reconstruction_figure
from .metrics import reconstruction_metrics
from .vae import FrozenVAE

__all__ = ["reconstruct"]


@torch.no_grad()
def reconstruct(
    vae: FrozenVAE, data: DataConfig, figure: Path, num_images: int = 500, show: int = 16, batch_size: int = 250
) -> Dict[str, float]:
    """Encode (posterior mean) and decode the first ``num_images`` images of ``data``; return
    PSNR, SSIM and the scaled latents' statistics, and draw the first ``show`` to ``figure``."""
    dataset = build_dataset(data, channels=vae.in_channels)
    originals, recons, latents, skipped = [], [], [], []
    for x, _ in image_batches(dataset, num_images, batch_size, data.skip_bad_images, skipped):  # (B, C, H, W)
        mean, std = vae.encode(x)
        recons.append(vae.autoencoder.decode(mean).sample.clamp(-1, 1).cpu())
        originals.append(x)
        latents.append(vae.scale(mean + std * torch.randn_like(std)).cpu())
    if not originals:
        raise DataError(f"{data.path or data.source}: no usable image to reconstruct; check data.path")
    originals, recons, latents = torch.cat(originals), torch.cat(recons), torch.cat(latents)
    n = len(originals)
    metrics = reconstruction_metrics(recons, originals)
    metrics.update(
        num_images=n,
        skipped_files=len(skipped),
        latent_mean=latents.mean().item(),
        latent_std=latents.std().item(),
        latent_channel_mean=latents.mean(dim=(0, 2, 3)).tolist(),
        latent_channel_std=latents.std(dim=(0, 2, 3)).tolist(),
        latent_shape=list(latents.shape[1:]),
        normalization=vae.normalization,
    )
    k = min(show, n)
    save_reconstruction_figure(to_uint8(originals[:k]), to_uint8(recons[:k]), figure)
    return metrics
