"""Image metrics. Images are float tensors in [-1, 1] (the model's range) of shape
(B, C, H, W); PSNR and SSIM are computed on [0, 1], as is usual."""

from __future__ import annotations

from typing import Dict

import torch

__all__ = ["psnr", "ssim", "reconstruction_metrics"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,), for images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5), shape (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(_unit(x), _unit(y), data_range=1.0, reduction="none")


def reconstruction_metrics(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Mean per-image PSNR and SSIM, plus PSNR of the pooled MSE (the stricter summary)."""
    pooled_mse = (_unit(x) - _unit(y)).pow(2).mean()
    return {
        "psnr": psnr(x, y).mean().item(),
        "psnr_pooled": (-10 * torch.log10(pooled_mse)).item(),
        "ssim": ssim(x, y).mean().item(),
    }
