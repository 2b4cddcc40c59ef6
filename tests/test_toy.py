import numpy as np
import pytest
import torch
from PIL import Image

from latentflow.commands.toy import toy
from latentflow.toy import TOY_DATA, sample_toy, train_toy


@pytest.mark.parametrize("name", sorted(TOY_DATA))
def test_toy_data_shapes_and_seeds(name):
    a, b = (
        sample_toy(name, 500, torch.Generator().manual_seed(1)),
        sample_toy(name, 500, torch.Generator().manual_seed(1)),
    )
    assert a.shape == (500, 2) and torch.equal(a, b) and a.abs().max() < 4


def test_the_flow_learns_the_data():
    """A few hundred steps already carry noise most of the way to the 8 Gaussians."""
    from latentflow.metrics import frechet_distance
    from latentflow.solvers import integrate

    model = train_toy("8gaussians", steps=400)
    x = integrate(model, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), "heun", 20).x
    real = sample_toy("8gaussians", 2000, torch.Generator().manual_seed(9))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    assert frechet_distance(x.numpy(), real.numpy()) < 0.2 * frechet_distance(noise.numpy(), real.numpy())


def test_a_tiny_toy_run_writes_the_gif_and_figures(tmp_path):
    done = toy("moons", tmp_path / "toy", steps=50, particles=200, frames=5, ode_steps=4)
    gif = Image.open(done["written"]["flow.gif"])
    assert gif.format == "GIF" and gif.n_frames == 5
    for name in ("field.png", "samples.png"):
        assert np.asarray(Image.open(done["written"][name])).ndim == 3
    assert done["nfe"] == 8 and "toy moons" in done["summary"]


def test_one_jump_of_the_average_velocity_learns_the_data_and_is_drawn(tmp_path):
    """MeanFlow on the 8 Gaussians: a single jump already carries noise most of the way."""
    from latentflow.metrics import frechet_distance
    from latentflow.solvers import integrate

    model = train_toy("8gaussians", steps=400, objective="meanflow")
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = integrate(lambda z, r, t: model(z, r, gap=t - r), noise, "meanflow", 1).x
    real = sample_toy("8gaussians", 2000, torch.Generator().manual_seed(9))
    assert frechet_distance(x.numpy(), real.numpy()) < 0.3 * frechet_distance(noise.numpy(), real.numpy())
    done = toy("moons", tmp_path / "toy", steps=30, particles=200, frames=3, ode_steps=4, objective="meanflow")
    assert np.asarray(Image.open(done["written"]["one_step.png"])).ndim == 3 and "one jump (NFE 1)" in done["summary"]
