import math

import pytest
import torch

from latentflow.solvers import FIXED_STEP_SOLVERS, integrate, nfe_per_step

x0 = torch.ones(3, 2, dtype=torch.float64)


def poly(degree):
    """dx/dt = (d+1) t^d, so x(1) = x(0) + 1 exactly."""
    return lambda x, t: (degree + 1) * t.reshape(-1, 1) ** degree * torch.ones_like(x)


@pytest.mark.parametrize("solver,exact_degree", [("euler", 0), ("midpoint", 1), ("heun", 1), ("rk4", 3)])
def test_exact_on_polynomials_of_their_order(solver, exact_degree):
    for d in range(exact_degree + 1):
        out = integrate(poly(d), x0, solver, steps=3).x
        torch.testing.assert_close(out, x0 + 1)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_convergence_order_on_exponential_decay(solver, order):
    """dx/dt = -x has x(1) = x0 / e; halving the step divides the error by ~2^order."""
    exact = x0 / math.e
    errors = [(integrate(lambda x, t: -x, x0, solver, steps=n).x - exact).abs().max().item() for n in (8, 16)]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.25)


@pytest.mark.parametrize("solver", list(FIXED_STEP_SOLVERS))
def test_nfe_is_counted_exactly(solver):
    calls = []

    def v(x, t):
        calls.append(t)
        assert t.shape == (x.shape[0],)  # t is always (B,)
        return -x

    result = integrate(v, x0, solver, steps=5)
    assert result.nfe == len(calls) == 5 * nfe_per_step(solver)


def test_dopri5_is_accurate_and_counts_its_evaluations():
    calls = []

    def v(x, t):
        calls.append(1)
        return -x

    result = integrate(v, x0, "dopri5", atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(result.x, x0 / math.e, atol=1e-7, rtol=1e-7)
    assert result.nfe == len(calls) > 6


def test_trajectory_is_kept_on_request():
    result = integrate(lambda x, t: torch.ones_like(x), x0, "euler", steps=4, keep_trajectory=True)
    assert len(result.trajectory) == 5 and result.times == [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(result.trajectory[2], x0 + 0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown solver"):
        integrate(lambda x, t: x, x0, "rk45")
    with pytest.raises(ValueError, match="steps"):
        integrate(lambda x, t: x, x0, "euler", steps=0)
