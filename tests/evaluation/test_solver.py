"""Solver error: the distance of a sampler's latents from the converged ODE solution."""

import torch

from latentflow.config import ExperimentConfig
from latentflow.evaluation.solver import converged_latents, solver_error
from latentflow.models import create_model
from latentflow.pipeline import pipeline_from_parts
from latentflow.vae import FrozenVAE


def test_the_error_shrinks_with_steps_at_the_solvers_order(tiny_vae_dir):
    torch.manual_seed(0)
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a gently curved field, not the zero one of a fresh model
    pipe = pipeline_from_parts(model.eval(), FrozenVAE.from_pretrained(str(tiny_vae_dir)), ExperimentConfig())
    labels = [i % 10 for i in range(20)]
    s = pipe.sampler_settings  # the default's guidance: 2, from t = 0.2
    reference, nfe = converged_latents(
        pipe, labels, 20, seed=3, cfg_scale=s.cfg_scale, guidance_interval=s.guidance_interval
    )
    assert nfe > 20 and reference.shape == (20, 4, 8, 8)
    errors = {}
    for steps in (4, 8, 16):
        draw = pipe.draw(
            labels, 20, solver="euler", steps=steps, generator=torch.Generator().manual_seed(3), decode=False
        )
        errors[steps] = solver_error(draw.latents, reference)["rms"]
    assert errors[4] > errors[8] > errors[16] > 0
    assert 1.6 < errors[8] / errors[16] < 2.4  # Euler is first order: half the step, half the error
    same = pipe.draw(
        labels, 20, solver="dopri5", atol=1e-6, rtol=1e-6, generator=torch.Generator().manual_seed(3), decode=False
    )
    assert solver_error(same.latents, reference) == {"rms": 0.0, "max_per_sample": 0.0, "n": 20}
