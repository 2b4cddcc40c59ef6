import numpy as np
import pytest
import torch

from latentflow.models import create_model
from latentflow.sampling import guided_velocity, sample_images
from latentflow.training.objective import drop_labels
from latentflow.vae import FrozenVAE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 3, 5, 9])


def test_guidance_scale_one_is_the_conditional_velocity(model, inputs):
    x, t, y = inputs
    torch.testing.assert_close(guided_velocity(model, y, 1.0)(x, t), model(x, t, y))


def test_guidance_scale_zero_is_the_unconditional_velocity(model, inputs):
    x, t, y = inputs
    torch.testing.assert_close(guided_velocity(model, y, 0.0)(x, t), model(x, t, None))


@pytest.mark.parametrize("scale", [0.5, 1.5, 4.0])
def test_guidance_extrapolates_from_unconditional_to_conditional(model, inputs, scale):
    x, t, y = inputs
    cond, uncond = model(x, t, y), model(x, t, None)
    torch.testing.assert_close(
        guided_velocity(model, y, scale)(x, t), uncond + scale * (cond - uncond), atol=1e-5, rtol=1e-4
    )


def test_guidance_interval_guides_only_inside_it(model, inputs):
    x, _, y = inputs
    v = guided_velocity(model, y, 3.0, interval=(0.2, 0.6))
    inside, outside = torch.full((4,), 0.4), torch.full((4,), 0.8)
    cond, uncond = model(x, inside, y), model(x, inside, None)
    torch.testing.assert_close(v(x, inside), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v(x, outside), model(x, outside, y))


def test_label_dropout_rate_and_null_label():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(labels, 0.1, null_label=10)
    is_null = dropped == 10
    assert 0.09 < is_null.float().mean() < 0.11
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_samples_depend_on_the_seed_only(model, tiny_vae_dir):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    kw = dict(solver="euler", steps=3, cfg_scale=1.5)
    a = sample_images(model, vae, (4, 8, 8), [1, 2, 3, 4, 5], seed=7, batch_size=5, **kw)
    b = sample_images(model, vae, (4, 8, 8), [1, 2, 3, 4, 5], seed=7, batch_size=2, **kw)
    c = sample_images(model, vae, (4, 8, 8), [1, 2, 3, 4, 5], seed=8, batch_size=5, **kw)
    assert a.images.shape == (5, 32, 32, 1) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.nfe == 3 and a.labels.tolist() == [1, 2, 3, 4, 5]
    unconditional = sample_images(model, vae, (4, 8, 8), None, 3, **kw)
    assert unconditional.labels.tolist() == [-1, -1, -1]


def test_settings_resolve_against_the_models_and_name_the_callers_flag():
    from latentflow.errors import LatentflowError
    from latentflow.sampling import SamplerSettings

    model = SamplerSettings(solver="euler", steps=8, cfg_scale=1.5, guidance_interval=[0.1, 0.9])
    s = SamplerSettings.resolve(model, steps=4)
    assert (s.solver, s.steps, s.cfg_scale, s.guidance_interval) == ("euler", 4, 1.5, [0.1, 0.9])
    assert SamplerSettings.resolve(model, guidance_interval=[]).guidance_interval is None  # the whole path
    assert SamplerSettings.resolve(model, conditional=False).cfg_scale == 0.0  # no labels: unconditional
    assert s.tag == "euler-4-cfg1.5-int0.1-0.9"
    with pytest.raises(LatentflowError, match=r"num_inference_steps 0: must be an integer in \[1, 10000\]"):
        SamplerSettings.resolve(model, steps=0)
    with pytest.raises(LatentflowError, match=r"--steps 0: must be an integer in \[1, 10000\]"):
        SamplerSettings.resolve(model, steps=0, names={"steps": "--steps"})
    with pytest.raises(LatentflowError, match=r"--steps 1000000000: must be an integer in \[1, 10000\]"):
        SamplerSettings.resolve(model, steps=10**9, names={"steps": "--steps"})  # a draw that would never end
    with pytest.raises(LatentflowError, match="atol 1e-300: must be a finite number >= 1e-10"):
        SamplerSettings.resolve(model, solver="dopri5", atol=1e-300)
    with pytest.raises(LatentflowError, match="solver '../../x': not one of euler"):
        SamplerSettings.resolve(model, solver="../../x")
    with pytest.raises(LatentflowError, match=r"guidance_interval \[0.9, 0.1\]: must be \[t_lo, t_hi\]"):
        SamplerSettings.resolve(model, guidance_interval=[0.9, 0.1])
    with pytest.raises(LatentflowError, match="guidance_scale inf: must be a finite number >= 0"):
        SamplerSettings.resolve(model, cfg_scale=float("inf"))


def test_a_jumping_model_takes_only_jumps_and_its_own_guidance():
    from latentflow.errors import LatentflowError
    from latentflow.sampling import SamplerSettings

    jumper = SamplerSettings(solver="meanflow", steps=1, cfg_scale=1.5, guidance_interval=None, objective="meanflow")
    assert SamplerSettings.resolve(jumper, steps=2).steps == 2
    assert SamplerSettings.resolve(jumper, cfg_scale=1.5).cfg_scale == 1.5
    assert SamplerSettings.resolve(jumper, cfg_scale=0).cfg_scale == 0  # unconditional: allowed
    with pytest.raises(LatentflowError, match="--solver 'heun': this model was trained with flow.objective=meanflow"):
        SamplerSettings.resolve(jumper, solver="heun", names={"solver": "--solver"})
    with pytest.raises(LatentflowError, match="guidance_scale 3.0: this model was trained with guidance 1.5 built in"):
        SamplerSettings.resolve(jumper, cfg_scale=3.0)
    with pytest.raises(LatentflowError, match="solver 'meanflow': meanflow jumps need a model trained with"):
        SamplerSettings.resolve(SamplerSettings(), solver="meanflow")  # a cfm model keeps every ODE solver
    learnt = SamplerSettings(
        solver="meanflow", steps=1, cfg_scale=1.5, guidance_interval=None, objective="meanflow", guidance_range=[1, 2.5]
    )
    assert [SamplerSettings.resolve(learnt, cfg_scale=s).cfg_scale for s in (1, 2.5, 0)] == [1, 2.5, 0]
    with pytest.raises(
        LatentflowError, match=r"--cfg-scale 3.0: this model learnt guidance scales from 1 to 2.5 \(flow"
    ):
        SamplerSettings.resolve(learnt, cfg_scale=3.0, names={"cfg_scale": "--cfg-scale"})


def test_one_jump_with_a_two_time_model_is_one_evaluation(tiny_vae_dir):
    torch.manual_seed(0)
    m = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10, two_times=True).eval()
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    one = sample_images(m, vae, (4, 8, 8), [1, 2], solver="meanflow", steps=1, cfg_scale=1.5, seed=3)
    two = sample_images(m, vae, (4, 8, 8), [1, 2], solver="meanflow", steps=2, cfg_scale=1.5, seed=3)
    assert one.nfe == 1 and two.nfe == 2 and one.images.shape == (2, 32, 32, 1)


def test_a_model_that_learnt_guidance_samples_at_the_scale_asked_for(tiny_vae_dir):
    torch.manual_seed(0)
    m = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10, two_times=True, guidance_range=[1, 3])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    draw = lambda s: sample_images(m.eval(), vae, (4, 8, 8), [1, 2], solver="meanflow", steps=1, cfg_scale=s, seed=3)
    low, high = draw(1.2).latents, draw(2.8).latents
    assert not torch.allclose(low, high)  # the scale reaches the model
    assert torch.equal(draw(1.2).latents, low)


def test_labels_are_read_one_way_everywhere():
    from latentflow.errors import LatentflowError
    from latentflow.sampling import labels_for

    names = ["circle", "square", "triangle"]
    assert labels_for("all", 5, 3) == [0, 1, 2, 0, 1]
    assert labels_for(None, 5, 3) is None and labels_for("none", 5, 3) is None
    assert labels_for("2", 3, 3) == [2, 2, 2] and labels_for("0,2", 4, 3) == [0, 2, 0, 2]
    assert labels_for([1, "triangle"], None, 3, names) == [1, 2]
    assert labels_for("square,circle", 3, 3, names) == [1, 0, 1]  # class names on the command line too
    assert labels_for("all", 4, 0) is None  # a model without classes
    with pytest.raises(
        LatentflowError,
        match=r"--labels: class 'hexagon' is not one of this model's classes \(circle, square, triangle\)",
    ):
        labels_for("hexagon", 1, 3, names, name="--labels")
    with pytest.raises(LatentflowError, match="class label 7 is out of range 0..2"):
        labels_for([7], 1, 3)
    with pytest.raises(LatentflowError, match="this model is unconditional"):
        labels_for("1", 1, 0)
