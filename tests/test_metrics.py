"""Image and distribution metrics on known cases."""

import numpy as np
import pytest
import torch

from latentflow.metrics import frechet_distance, precision_recall, psnr


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0))


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet_distance(a, a + [3.0, 0.0, 4.0]) == pytest.approx(25.0, rel=1e-6)


def test_precision_and_recall_tell_fidelity_from_coverage():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=8.0, size=(10, 16))  # ten well-separated modes

    def mixture(n, modes):
        k = rng.choice(modes, n)
        return centres[k] + rng.normal(size=(n, 16))

    real = mixture(2000, range(10))
    same = precision_recall(real, mixture(2000, range(10)))  # in 16-d at k = 3, about 0.8 each
    assert same["precision"] > 0.7 and same["recall"] > 0.7
    half = precision_recall(real, mixture(2000, range(5)))  # only half the modes: as faithful, half as diverse
    assert abs(half["precision"] - same["precision"]) < 0.05 and half["recall"] < 0.6 * same["recall"]
    off = precision_recall(real, mixture(2000, range(10)) + 6.0)  # everything displaced: unfaithful
    assert off["precision"] < 0.1 and off["recall"] < 0.1
    assert 0 < same["precision_std"] < 0.01 and same["k"] == 3
