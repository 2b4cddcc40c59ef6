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


# --- average velocity (MeanFlow) on Gaussian data, where everything is known exactly -----------
#
# With data x1 ~ N(mu, s^2 I) and noise x0 ~ N(0, I), the marginal at time t is
# N(m_t, std_t^2 I) with m_t = t mu and std_t^2 = a_t^2 + t^2 s^2 (a_t = 1 - (1 - σ) t), and the
# ODE keeps each point's standardised position: Φ_{r->t}(z) = m_t + (std_t / std_r)(z - m_r).

MU, S = 0.7, 0.4


def _std(t, sigma):
    a = 1 - (1 - sigma) * t
    return (a**2 + (t * S) ** 2).sqrt()


def _flow_map(z, r, t, sigma):
    rb, tb = (x.reshape(-1, 1, 1, 1) for x in (r, t))
    return MU * tb + (_std(tb, sigma) / _std(rb, sigma)) * (z - MU * rb)


def _exact_average(z, r, t, sigma):
    """u(z, r, t) = (Φ_{r->t}(z) - z) / (t - r), and v(z, r) where t = r."""
    rb, tb = (x.reshape(-1, 1, 1, 1) for x in (r, t))
    return torch.where(
        tb > rb, (_flow_map(z, r, t, sigma) - z) / (tb - rb).clamp_min(1e-12), _exact_velocity(z, r, sigma)
    )


def _exact_velocity(z, r, sigma):
    rb = r.reshape(-1, 1, 1, 1)
    a = 1 - (1 - sigma) * rb
    dvar = -2 * (1 - sigma) * a + 2 * rb * S**2  # d/dr std_r^2
    return MU + dvar / (2 * _std(rb, sigma) ** 2) * (z - MU * rb)


@pytest.fixture
def gaussian():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(6, generator=g, dtype=torch.float64) * 0.6
    t = r + torch.rand(6, generator=g, dtype=torch.float64) * (1 - r)
    z = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    return z, r, t


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
def test_the_exact_average_velocity_satisfies_the_meanflow_identity(gaussian, sigma):
    from latentflow.flow import meanflow_target, time_derivative

    z, r, t = gaussian
    v = _exact_velocity(z, r, sigma)
    u, dudr = time_derivative(lambda z_, r_: _exact_average(z_, r_, t, sigma), z, r, v)
    torch.testing.assert_close(meanflow_target(v, dudr, r, t), u)  # u = v + (t - r) du/dr
    # and the jump lands where the ODE goes
    torch.testing.assert_close(z + (t - r).reshape(-1, 1, 1, 1) * u, _flow_map(z, r, t, sigma))


def test_the_forward_mode_derivative_matches_finite_differences(gaussian):
    from latentflow.flow import time_derivative

    z, r, t = gaussian
    dz = torch.randn_like(z)
    f = lambda z_, r_: _exact_average(z_, r_, t, 1e-3)
    _, dudr = time_derivative(f, z, r, dz)
    eps = 1e-6
    fd = (f(z + eps * dz, r + eps) - f(z - eps * dz, r - eps)) / (2 * eps)
    torch.testing.assert_close(dudr, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_difference_derivative_agrees_with_forward_mode(gaussian, dtype):
    from latentflow.flow import difference_derivative, time_derivative

    z, r, t = (v.to(dtype) for v in gaussian)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    f = lambda z_, r_: _exact_average(z_, r_, t, 1e-3)
    u, exact = time_derivative(f, z, r, dz)
    u_, dudr = difference_derivative(f, z, r, dz)
    torch.testing.assert_close(u_, u)
    assert dudr.dtype == dtype and float(exact.abs().max()) > 1
    torch.testing.assert_close(dudr, exact, rtol=1e-2, atol=1e-2)  # first order in the step of 1e-3


def test_where_r_equals_t_the_meanflow_loss_is_the_cfm_loss(pair):
    from latentflow.flow import meanflow_loss

    x0, x1 = pair
    t = torch.rand(5, dtype=torch.float64)
    net = lambda z, r, t_: torch.tanh(z * (1 + r.reshape(-1, 1, 1, 1)) + (t_ - r).reshape(-1, 1, 1, 1))
    loss, error = meanflow_loss(net, x0, x1, t, t, 1e-3, power=0)
    torch.testing.assert_close(loss, cfm_loss(lambda z, r: net(z, r, r), x0, x1, t, 1e-3))
    torch.testing.assert_close(error, loss)
    weighted, _ = meanflow_loss(net, x0, x1, t, t, 1e-3, power=1)  # adaptive weight: error / (error + 1e-3)
    torch.testing.assert_close(weighted, error / (error + 1e-3))


def test_with_the_marginal_velocity_as_tangent_the_exact_average_leaves_only_the_pairs_noise(gaussian):
    """Improved MeanFlow's tangent: with the true instantaneous velocity as the direction of the
    derivative, the exact average velocity's residual is the conditional velocity's deviation
    from the marginal one, whatever the gap; with the pair's own velocity it is not."""
    from latentflow.flow import meanflow_loss, target_velocity

    z, r, t = gaussian
    sigma = 1e-3
    x1 = MU + S * torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=z.dtype)
    x0 = (z - r.reshape(-1, 1, 1, 1) * x1) / (1 - (1 - sigma) * r.reshape(-1, 1, 1, 1))  # the pair through z at r
    average = lambda z_, r_, t_: _exact_average(z_, r_, t_, sigma)
    marginal, conditional = _exact_velocity(z, r, sigma), target_velocity(x0, x1, sigma)
    noise = (conditional - marginal).pow(2).flatten(1).mean(1).float()  # the loss works in float32
    _, error = meanflow_loss(average, x0, x1, r, t, sigma, tangent=marginal, power=0)
    torch.testing.assert_close(error, noise)
    _, error = meanflow_loss(average, x0, x1, r, t, sigma, v=marginal, power=0)  # tangent defaults to v
    torch.testing.assert_close(error, torch.zeros_like(error))
    _, own = meanflow_loss(average, x0, x1, r, t, sigma, power=0)  # the original: the pair's velocity
    assert float((own - noise).abs().max()) > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_jumps_with_the_exact_average_velocity_land_on_the_ode_solution(steps):
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    jumped = integrate(lambda z, r, t: _exact_average(z, r, t, 1e-3), z0, "meanflow", steps)
    assert jumped.nfe == steps
    ode = integrate(lambda z, t: _exact_velocity(z, t, 1e-3), z0, "dopri5", atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(jumped.x, ode.x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        jumped.x, _flow_map(z0, torch.zeros(8, dtype=z0.dtype), torch.ones(8, dtype=z0.dtype), 1e-3)
    )


def test_two_times_are_ordered_equal_in_their_share_and_within_the_gap():
    from latentflow.flow import sample_two_times

    g = torch.Generator().manual_seed(0)
    r, t = sample_two_times(20000, 0.75, 0.3, generator=g, scheme="uniform")
    assert bool((r <= t).all()) and float((t - r).max()) <= 0.3 + 1e-7
    assert abs(float((r == t).double().mean()) - 0.75) < 0.02


def test_a_jump_share_trains_on_the_intervals_the_sampler_visits():
    from latentflow.flow import sample_two_times

    plain = sample_two_times(4000, 0.5, generator=torch.Generator().manual_seed(1), scheme="logit_normal")
    same = sample_two_times(
        4000, 0.5, jump_share=0.0, generator=torch.Generator().manual_seed(1), scheme="logit_normal"
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, same))  # off: the random stream of earlier runs
    r, t = sample_two_times(
        4000, 0.5, jump_share=1.0, jump_steps=[1, 2], generator=torch.Generator().manual_seed(1), scheme="logit_normal"
    )
    pairs = {(a, b) for a, b in zip(r.tolist(), t.tolist()) if a != b}
    assert pairs == {(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)}  # one jump's interval and two jumps' two
    assert abs(float((r == t).double().mean()) - 0.5) < 0.03  # the equal share is kept
    # without it the corner one jump asks for is almost never drawn
    r0, t0 = plain
    assert float(((r0 < 0.05) & (t0 > 0.95)).double().mean()) < 0.005
