"""Image and distribution metrics: pure math on arrays, no files or models.

Images are float tensors in [-1, 1] (the model's range) of shape (B, C, H, W); PSNR and SSIM
are computed on [0, 1], as is usual. The Fréchet distance works on feature arrays (N, D).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["fd_gaussians", "frechet_distance", "precision_recall", "psd_sqrt", "psnr", "reconstruction_metrics", "ssim"]


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


# --- Fréchet distance ---------------------------------------------------------------------------


def psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fd_gaussians(mu_a, cov_a, mu_b, cov_b, sqrt_b: Optional[np.ndarray] = None) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Heusel et al. 2017, eq. 6).

    Tr (S_a S_b)^(1/2) = Tr (S_b^(1/2) S_a S_b^(1/2))^(1/2), the sum of the square roots of
    the eigenvalues of a symmetric matrix: exact, and with S_b^(1/2) of a fixed reference
    computed once, fast enough for a bootstrap."""
    root = psd_sqrt(cov_b) if sqrt_b is None else sqrt_b
    w = np.linalg.eigvalsh(root @ cov_a @ root)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(w, 0, None)).sum()
    )


def mean_cov(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    return fd_gaussians(*mean_cov(a), *mean_cov(b))


# --- precision and recall ------------------------------------------------------------------------


def _knn_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of ``x`` (N, D) to its k-th nearest other row, shape (N,)."""
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)  # (c, N)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the nearest (k + 1)-th is k-th after itself
    return torch.cat(out)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Whether each row of ``points`` lies in some ball (centre, radius), shape (M,) bool."""
    out = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], centres)  # (c, N)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls around its points reaching their k-th nearest neighbour. Precision is the
    share of ``fake`` inside the real manifold (fidelity), recall the share of ``real`` inside
    the fake one (coverage). Each comes with its standard error given the manifold it is
    measured against, sqrt(p (1 - p) / n)."""
    a = torch.as_tensor(np.asarray(real, np.float32))
    b = torch.as_tensor(np.asarray(fake, np.float32))
    precision = _covered(b, a, _knn_radius(a, k)).double().mean().item()
    recall = _covered(a, b, _knn_radius(b, k)).double().mean().item()
    return {
        "precision": precision,
        "precision_std": float(np.sqrt(precision * (1 - precision) / len(b))),
        "recall": recall,
        "recall_std": float(np.sqrt(recall * (1 - recall) / len(a))),
        "k": k,
    }
