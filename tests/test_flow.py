import pytest
import torch

from latentflow.flow import cfm_loss, interpolate, sample_time, target_velocity
from latentflow.solvers import integrate

SIGMAS = [0.0, 1e-3, 0.1]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(
        5, 4, 8, 8, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("sigma", SIGMAS)
def test_path_endpoints(pair, sigma):
    x0, x1 = pair
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(interpolate(x0, x1, zeros, sigma), x0)  # t = 0 is noise
    torch.testing.assert_close(interpolate(x0, x1, ones, sigma), x1 + sigma * x0)  # t = 1 is data (+ σ noise)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_target_is_time_derivative_of_path(pair, sigma):
    """u_t = dψ_t/dt, checked by central finite differences at random times."""
    x0, x1 = pair
    t = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    h = 1e-6
    fd = (interpolate(x0, x1, t + h, sigma) - interpolate(x0, x1, t - h, sigma)) / (2 * h)
    torch.testing.assert_close(fd, target_velocity(x0, x1, sigma), atol=1e-6, rtol=1e-6)


def test_target_matches_the_formula_written_out(pair):
    x0, x1 = pair
    torch.testing.assert_close(target_velocity(x0, x1, 1e-3), x1 - 0.999 * x0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_solver_follows_the_conditional_path(pair, sigma):
    """The sampler's convention agrees with the loss's: integrating the conditional field
    u_t(x | x1) = (x1 - (1 - σ) x) / (1 - (1 - σ) t) from noise at t = 0 ends on ψ_1."""
    x0, x1 = pair

    def field(x, t):
        tb = t.reshape(-1, 1, 1, 1)
        return (x1 - (1 - sigma) * x) / (1 - (1 - sigma) * tb)

    end = integrate(field, x0, "rk4", steps=200, t1=1.0 - 1e-9 if sigma == 0 else 1.0).x
    torch.testing.assert_close(end, x1 + sigma * x0, atol=1e-5, rtol=1e-5)


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise(pair):
    x0, x1 = pair
    t = torch.rand(5, dtype=torch.float64)
    exact = lambda x, t, **_: target_velocity(x0, x1, 1e-3)
    assert cfm_loss(exact, x0, x1, t, 1e-3).abs().max() < 1e-12
    zero = lambda x, t, **_: torch.zeros_like(x)
    loss = cfm_loss(zero, x0, x1, t, 1e-3)
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, target_velocity(x0, x1, 1e-3).pow(2).flatten(1).mean(1).float())


def test_loss_passes_labels_to_the_network(pair):
    x0, x1 = pair
    seen = {}

    def net(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)

    cfm_loss(net, x0, x1, torch.rand(5), 1e-3, y=torch.arange(5))
    assert seen["y"].tolist() == [0, 1, 2, 3, 4]


def test_stratified_times_hit_every_bin_once():
    t = sample_time(64, "stratified", generator=torch.Generator().manual_seed(1))
    assert t.shape == (64,) and t.min() >= 0 and t.max() < 1
    assert sorted((t * 64).floor().long().tolist()) == list(range(64))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_other_time_samplers(scheme):
    t = sample_time(4096, scheme, generator=torch.Generator().manual_seed(2))
    assert t.shape == (4096,) and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.03


def test_logit_normal_concentrates_mid_path():
    t = sample_time(20_000, "logit_normal", generator=torch.Generator().manual_seed(3))
    u = sample_time(20_000, "uniform", generator=torch.Generator().manual_seed(3))
    mid = lambda s: ((s > 0.25) & (s < 0.75)).float().mean()
    assert mid(t) > mid(u) + 0.1


def test_unknown_time_sampler():
    with pytest.raises(ValueError, match="unknown time sampler"):
        sample_time(4, "cosine")


def test_times_stay_below_t_max():
    from latentflow.flow import sample_time

    g = torch.Generator().manual_seed(0)
    for scheme in ("stratified", "uniform", "logit_normal"):
        t = sample_time(4096, scheme, generator=g, t_max=1 - 1e-5)
        assert t.shape == (4096,) and float(t.min()) >= 0 and float(t.max()) < 1 - 1e-5
    strat = sample_time(8, "stratified", generator=torch.Generator().manual_seed(3), t_max=1 - 1e-5)
    gaps = (strat.sort().values.diff() * 8).round()
    assert torch.all(gaps == 1)  # evenly spaced, one per 1/B (modulo wrap-around)
