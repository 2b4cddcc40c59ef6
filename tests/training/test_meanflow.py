"""The MeanFlow objective in training: the forward-mode derivative through the real DiT and
UNet (attention included, on the kernel that supports it), gradients that DDP synchronises
across processes, and a few optimizer steps of the training loss that learn."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentflow.config import FlowConfig
from latentflow.flow import meanflow_loss, time_derivative
from latentflow.models import create_model
from latentflow.training.objective import forward_mode_attention, training_loss
from tests.conftest import torchrun

HERE = Path(__file__).resolve().parent


def two_time_dit(name="DiT-Nano/2", **kw):
    torch.manual_seed(0)
    model = create_model(name, sample_size=8, in_channels=4, num_classes=10, two_times=True, **kw)
    with torch.no_grad():  # off the zero-initialised output, so every weight gets gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    r = torch.rand(n, generator=g) * 0.5
    t = r + torch.rand(n, generator=g) * 0.5
    return x0, x1, r, t, torch.randint(0, 11, (n,), generator=g)


def meanflow_grads(model, raw, x0, x1, r, t, y, difference=False):
    """Gradients of the mean MeanFlow loss (with a guidance pass without gradient first, as
    training makes one), keyed by parameter name."""
    with torch.no_grad():
        model(x0, r, torch.full_like(y, 10))
    average = lambda z, r_, t_: model(z, r_, y, gap=t_ - r_)
    loss, _ = forward_mode_attention(lambda: meanflow_loss(average, x0, x1, r, t, 1e-3, difference=difference), "cpu")
    loss.mean().backward()
    return {k: p.grad.detach().clone() for k, p in raw.named_parameters()}


@pytest.mark.parametrize("name", ["DiT-Nano/2", "UNet-S"])
def test_the_derivative_through_each_backbone_matches_finite_differences(name):
    model = two_time_dit(name).double()
    x0, x1, r, t, y = (v.double() if v.is_floating_point() else v for v in batch(3))
    dz = torch.randn_like(x0)
    f = lambda z, r_: model(z, r_, y, gap=t - r_)
    _, dudr = forward_mode_attention(lambda: time_derivative(f, x0, r, dz), "cpu")
    eps = 1e-3  # the time features are computed in float32, so a step far above its rounding
    with torch.no_grad():
        fd = (f(x0 + eps * dz, r + eps) - f(x0 - eps * dz, r - eps)) / (2 * eps)
    torch.testing.assert_close(dudr, fd, rtol=1e-3, atol=1e-4)
    assert float(dudr.abs().max()) > 1e-2  # a derivative worth comparing


def test_under_accelerates_bf16_the_difference_is_taken_in_float32():
    """Accelerate runs a bf16 model's forward under autocast whatever the caller does. In bf16
    the two ends of a step of 1e-3 agree to about three digits: their difference would be
    noise. The objective takes both ends in float32, and the loss then matches the exact
    (forward-mode, float32) one; the bf16 model is left as it was."""
    import copy
    from dataclasses import replace

    from accelerate.state import AcceleratorState, GradientState

    import latentflow.training.objective as objective
    from latentflow.distributed import computes_in_low_precision, float32_forward, make_accelerator

    accelerator = make_accelerator("bf16", cpu=True)
    model = two_time_dit(guidance_range=[1.0, 2.5])
    reference = copy.deepcopy(model)
    prepared = accelerator.prepare(model)
    x0, x1, r, t, y = batch(8)
    assert computes_in_low_precision(prepared, "cpu") and not computes_in_low_precision(reference, "cpu")
    with torch.no_grad():
        mixed = prepared(x0, r, y, gap=t - r)
        with float32_forward(prepared, "cpu"):
            full = prepared(x0, r, y, gap=t - r)
        assert torch.equal(full, reference(x0, r, y, gap=t - r)) and not torch.equal(mixed, full)
        assert torch.equal(prepared(x0, r, y, gap=t - r), mixed)  # bf16 again after the block

    flow = FlowConfig(objective="meanflow", tangent="model", time_sampler="uniform", guidance_range=[1.0, 2.5])
    flow = replace(flow, derivative="difference")
    labels = y.clamp_max(9)

    def error(m, f):
        return training_loss(m, x1, labels, f, 0.1, 10, torch.Generator().manual_seed(0), cfg_scale=1.5)[2].detach()

    exact = error(reference, replace(flow, derivative="jvp"))
    torch.testing.assert_close(error(prepared, flow), exact, rtol=1e-2, atol=0)
    objective.computes_in_low_precision, kept = (lambda *_: False), objective.computes_in_low_precision
    try:  # the difference of the bf16 passes themselves: far off
        assert float(((error(prepared, flow) - exact).abs() / exact).max()) > 0.05
    finally:
        objective.computes_in_low_precision = kept
        AcceleratorState._reset_state(True)  # the next test's Accelerator starts afresh
        GradientState._reset_state()


@pytest.mark.slow
def test_two_processes_average_the_same_gradients_as_one(tmp_path):
    torchrun(HERE / "ddp_meanflow_worker.py", tmp_path)
    for derivative in ("jvp", "difference"):
        model = two_time_dit()
        one = meanflow_grads(model, model, *batch(), difference=derivative == "difference")
        ddp = load_file(str(tmp_path / f"ddp-{derivative}.safetensors"))
        assert set(ddp) == set(one)
        for k in one:
            torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-6, msg=f"{derivative}: {k}")


@pytest.mark.parametrize("tangent, derivative", [("conditional", "jvp"), ("model", "jvp"), ("model", "difference")])
def test_the_training_loss_learns_with_guidance_and_the_curriculum(tangent, derivative):
    flow = FlowConfig(
        objective="meanflow", gap_warmup_steps=10, time_sampler="uniform", tangent=tangent, derivative=derivative
    )
    model = two_time_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(32, 4, 8, 8, generator=g) * 0.5 + 0.3
    labels = torch.randint(0, 10, (32,), generator=g)
    errors = []
    for step in range(30):
        loss, r, error = training_loss(model, x1, labels, flow, 0.1, 10, g, cfg_scale=1.5, step=step)
        assert bool((r >= 0).all()) and loss.shape == error.shape == (32,)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        errors.append(float(error.detach().mean()))
    assert all(torch.isfinite(torch.tensor(errors))) and min(errors[-5:]) < errors[0]


def test_with_a_guidance_range_each_pair_is_guided_at_its_own_scale_and_the_model_is_told_it():
    flow = FlowConfig(objective="meanflow", tangent="model", time_sampler="uniform", guidance_range=[1.0, 3.0])
    model = two_time_dit(guidance_range=[1.0, 3.0])
    calls = []

    def recording(z, r, y, **inputs):
        calls.append((y, inputs))
        return model(z, r, y, **inputs)

    g = torch.Generator().manual_seed(0)
    x1, labels = torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    loss, _, _ = training_loss(recording, x1, labels, flow, 0.3, 10, g, cfg_scale=2.0, step=0)
    (passes, first), (jvp, second) = calls[0], calls[-1]  # the pass without gradient, the derivative's
    own, scale = passes[:32], first["guidance"][:32]
    assert torch.equal(own, jvp) and torch.equal(second["guidance"], scale)  # the same scale both times
    kept = own != 10
    assert 0 < int(kept.sum()) < 32  # some labels dropped, some kept
    assert bool((scale[~kept] == 1).all())  # a pair without label is unguided
    assert bool(((scale[kept] >= 1) & (scale[kept] <= 3)).all()) and len(set(scale[kept].tolist())) == int(kept.sum())
    assert bool((passes[32:] == 10).all()) and bool((first["guidance"][32:] == 1).all())  # the unconditional pass
    assert torch.isfinite(loss).all()


def test_instant_steps_train_plain_flow_matching_without_a_derivative_then_the_gaps_open():
    import torch.autograd.forward_ad as fwAD

    flow = FlowConfig(objective="meanflow", tangent="model", equal_times=0.1, instant_steps=3, gap_warmup_steps=2)
    model = two_time_dit()
    calls = []

    def recording(z, r, y, gap=None, **inputs):
        calls.append((len(y), fwAD.unpack_dual(z).tangent is not None, gap))
        return model(z, r, y, gap=gap, **inputs)

    g = torch.Generator().manual_seed(0)
    x1, labels = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    for step, opened in [(0, False), (2, False), (3, False), (4, True)]:
        calls.clear()
        loss, r, error = training_loss(recording, x1, labels, flow, 0.1, 10, g, cfg_scale=1.5, step=step)
        assert torch.isfinite(loss).all()
        (guidance, _, _), (_, dual, gap) = calls[0], calls[-1]  # the pass without gradient, the loss's
        if not opened:  # every r = t (step 3: the gaps open, at width 0): no tangent pass, no derivative
            assert guidance == 16 and not dual and bool((gap == 0).all())
        else:  # the model's tangent joins the guidance pass, and the derivative runs
            assert guidance == 32 and dual and bool((gap > 0).any())
            assert float(gap.max()) <= (step - 3) / 2  # the curriculum counts from the end of the phase


def test_the_difference_runs_plain_passes_at_the_moved_point_and_no_forward_mode():
    import torch.autograd.forward_ad as fwAD

    flow = FlowConfig(objective="meanflow", tangent="model", time_sampler="uniform", derivative="difference")
    model = two_time_dit()
    calls = []

    def recording(z, r, y, gap=None, **inputs):
        out = model(z, r, y, gap=gap, **inputs)
        calls.append((z.detach().clone(), r.detach().clone(), gap, fwAD.unpack_dual(z).tangent is not None, out))
        return out

    g = torch.Generator().manual_seed(0)
    x1, labels = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    loss, _, _ = training_loss(recording, x1, labels, flow, 0.1, 10, g, cfg_scale=1.5, step=0)
    assert torch.isfinite(loss).all() and len(calls) == 3 and not any(dual for *_, dual, _ in calls)
    (at, _, _, _, velocity), (z, r, gap, _, _), (moved, later, closer, _, _) = calls  # tangent, loss, moved
    torch.testing.assert_close(at[:16], z)  # the model's velocity is taken at the loss's point
    torch.testing.assert_close(later - r, torch.full_like(r, 1e-3))  # one step on in time, same end time
    torch.testing.assert_close(gap - closer, torch.full_like(gap, 1e-3))
    torch.testing.assert_close(moved - z, 1e-3 * velocity[:16].detach(), rtol=1e-3, atol=1e-6)  # along it


def test_without_gaps_the_loss_skips_the_derivative_and_equals_the_full_one():
    model = two_time_dit()
    x0, x1, r, _, y = batch()
    average = lambda z, r_, t_: model(z, r_, y, gap=t_ - r_)
    full = forward_mode_attention(lambda: meanflow_loss(average, x0, x1, r, r, 1e-3), "cpu")
    skipped = meanflow_loss(average, x0, x1, r, r, 1e-3, derivative=False)
    for a, b in zip(full, skipped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_with_mixed_precision_refuses_the_difference_in_one_line():
    """FSDP casts the sharded weights to bf16 for every pass, so the difference could only be
    taken between bf16 outputs: the run is refused before it starts, naming what to use."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from latentflow.config import load_config
    from latentflow.errors import LatentflowError
    from latentflow.training.setup import _check_the_difference_runs_in_float32 as check

    cfg = load_config("meanflow")
    fsdp = lambda precision: SimpleNamespace(distributed_type=DistributedType.FSDP, mixed_precision=precision)
    with pytest.raises(LatentflowError, match="flow.derivative=difference needs float32 passes.*flow.derivative=jvp"):
        check(cfg, fsdp("bf16"))
    check(cfg, fsdp("no"))  # float32 weights: the passes are float32
    check(load_config("meanflow", ["flow.derivative=jvp"]), fsdp("bf16"))
    check(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="bf16"))
