"""Reconstruction sanity check: does the VAE embed these images faithfully?

Encodes images (posterior mean), decodes them, and reports PSNR, SSIM and the mean/std of
the latents after scaling (a well-scaled VAE gives roughly 0 and 1). Writes an original /
reconstruction / |difference| figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from .config import DataConfig
from .data import build_dataset
from .figures import save_reconstruction_figure
from .metrics import reconstruction_metrics
from .sampling import to_uint8
from .vae import FrozenVAE

__all__ = ["reconstruct", "reconstruction_check"]


@torch.no_grad()
def reconstruct(
    vae: FrozenVAE, data: DataConfig, figure: Path, num_images: int = 500, show: int = 16, batch_size: int = 250
) -> Dict[str, float]:
    dataset = build_dataset(data, channels=vae.in_channels)
    n = min(num_images, len(dataset))
    originals, recons, latents = [], [], []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))])  # (B, C, H, W)
        mean, std = vae.encode(x)
        recons.append(vae.autoencoder.decode(mean).sample.clamp(-1, 1).cpu())
        originals.append(x)
        latents.append(vae.scale(mean + std * torch.randn_like(std)).cpu())
    originals, recons, latents = torch.cat(originals), torch.cat(recons), torch.cat(latents)
    metrics = reconstruction_metrics(recons, originals)
    metrics.update(
        num_images=n,
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


def reconstruction_check(
    vae_name: str = "embedded",
    subfolder: Optional[str] = None,
    data: Optional[Dict[str, object]] = None,
    num_images: int = 500,
    out: Optional[Path] = None,
    overwrite: bool = False,
) -> Dict:
    """``python main.py reconstruct``: load a VAE, run ``reconstruct`` on the data described
    by ``data`` (keys of the ``data:`` section; default the bundled test digits), and write
    the figure plus its numbers as JSON beside it (default ``runs/reconstruct-<time>/``)."""
    import json

    from .checkpoint import new_run_dir
    from .config import _build
    from .runtime import check_output, write_text_atomic

    if out is not None:
        check_output(Path(out), overwrite)
    values = {"split": "test", **(data or {})}
    data_cfg = _build(DataConfig, values, "data.")
    data_cfg.validate()
    vae = FrozenVAE.from_pretrained(vae_name, subfolder)
    figure = Path(out) if out else new_run_dir(Path("runs"), "reconstruct") / "reconstruction.png"
    metrics = reconstruct(vae, data_cfg, figure, num_images=num_images)
    write_text_atomic(figure.with_suffix(".json"), json.dumps({"vae": vae_name, "data": vars(data_cfg), **metrics},
                                                               indent=2), "reconstruction report")
    metrics["summary"] = (
        f"VAE {vae_name}: PSNR {metrics['psnr']:.2f} dB (pooled {metrics['psnr_pooled']:.2f} dB), "
        f"SSIM {metrics['ssim']:.4f} on {metrics['num_images']} images; scaled latents "
        f"{tuple(metrics['latent_shape'])} mean {metrics['latent_mean']:+.3f} std {metrics['latent_std']:.3f}; "
        f"figure {figure}"
    )
    return metrics
