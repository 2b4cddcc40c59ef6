"""Reference statistics and the Fréchet distance (FD) with its uncertainty."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from ..errors import LatentflowError
from ..metrics import fd_gaussians, mean_cov, psd_sqrt

__all__ = ["BOOTSTRAP", "FDStats", "fd_with_spread", "matched_fd"]

BOOTSTRAP = 50  # resamples for the FD spread
STATS_FORMAT = "latentflow-fd-stats-1"


@dataclass
class FDStats:
    """Mean and covariance of features of ``n`` images; ``feature_net`` names the net (an
    identity with a hash of its weights) and ``description`` the images."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_net: str
    description: str

    @property
    def sigma_sqrt(self) -> np.ndarray:
        if getattr(self, "_sqrt", None) is None:
            self._sqrt = psd_sqrt(self.sigma)
        return self._sqrt

    def fd(self, features: np.ndarray) -> float:
        return fd_gaussians(*mean_cov(features), self.mu, self.sigma, self.sigma_sqrt)

    @classmethod
    def of(cls, features: np.ndarray, feature_net: str, description: str) -> FDStats:
        return cls(*mean_cov(features), len(features), feature_net, description)

    def save(self, path: Path) -> Path:
        from ..files import atomic_file

        with atomic_file(Path(path), "FD statistics") as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    mu=self.mu,
                    sigma=self.sigma,
                    n=self.n,
                    feature_net=self.feature_net,
                    description=self.description,
                    format=STATS_FORMAT,
                )
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> FDStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                values = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise LatentflowError(
                f"--reference {path}: not an FD statistics file ({exc}); make one with `python main.py fd-stats`"
            ) from None
        if str(values.get("format", "")) != STATS_FORMAT or not {"mu", "sigma", "n"} <= set(values):
            raise LatentflowError(
                f"--reference {path}: not an FD statistics file of latentflow; make one with `python main.py fd-stats`"
            )
        mu, sigma = values["mu"], values["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise LatentflowError(f"--reference {path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, int(values["n"]), str(values["feature_net"]), str(values["description"]))


def fd_with_spread(
    features: np.ndarray, ref: FDStats, bootstrap: int = BOOTSTRAP, seed: int = 0
) -> Tuple[float, float]:
    """FD of ``features`` (N, D) to ``ref``, and its bootstrap standard deviation."""
    f = np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    draws = [ref.fd(f[rng.integers(0, len(f), len(f))]) for _ in range(bootstrap)]
    return ref.fd(f), float(np.std(draws))


def matched_fd(features: np.ndarray, ref: FDStats, n: int) -> Dict[str, float]:
    """FD at sample size ``n``: mean and standard deviation over the disjoint subsets of
    ``n`` samples that ``features`` holds (with fewer than 2 subsets, the bootstrap spread)."""
    f = np.asarray(features, np.float64)
    k = len(f) // n
    if k >= 2:
        values = [ref.fd(s) for s in np.split(f[: k * n], k)]
        return {"n": n, "subsets": k, "fd": float(np.mean(values)), "std": float(np.std(values))}
    fd, std = fd_with_spread(f[:n], ref)
    return {"n": min(n, len(f)), "subsets": 1, "fd": fd, "std": std}
