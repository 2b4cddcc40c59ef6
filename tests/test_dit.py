import pytest
import torch

from latentflow.models import MODELS, create_model
from latentflow.models.dit import DiT, sincos_pos_embed_2d


def small(**kw):
    return create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10, **kw)


def test_registry_has_the_standard_presets():
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert f"DiT-{size}/{patch}" in MODELS


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 3, 9, 10])])
def test_output_shape_and_zero_init(labels):
    model = small()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    out = model(x, t, labels)
    assert out.shape == x.shape
    assert out.abs().max() == 0  # adaLN-Zero: the untrained field is zero


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_labels_and_time_change_the_output_and_none_means_null():
    model = perturbed(small())
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    y = torch.tensor([1, 2])
    null = torch.full((2,), model.null_label)
    assert not torch.allclose(model(x, t, y), model(x, t, null))
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))
    torch.testing.assert_close(model(x, t, None), model(x, t, null))


def test_batch_items_are_independent():
    model = perturbed(small())
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    torch.testing.assert_close(model(x, t, y)[1:2], model(x[1:2], t[1:2], y[1:2]), atol=1e-5, rtol=1e-4)


def test_output_layer_learns_from_zero_init():
    model = small()
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    (out - 1).pow(2).mean().backward()
    # at zero init only the final layer gets gradient; after one step everything does
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_patch_must_divide_latent_size():
    with pytest.raises(ValueError, match="patch size 4 does not divide"):
        DiT(sample_size=6, in_channels=4, patch_size=4, hidden_size=64, depth=1, num_heads=2)


def test_position_embedding_is_distinct_per_patch():
    pe = sincos_pos_embed_2d(64, 4)
    assert pe.shape == (16, 64)
    assert torch.cdist(pe, pe).add(torch.eye(16)).min() > 0.1


def test_unconditional_model_has_only_the_null_label():
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=0)
    assert model.null_label == 0 and model.y_embedder.num_embeddings == 1
    assert model(torch.randn(2, 4, 8, 8), torch.rand(2)).shape == (2, 4, 8, 8)


def test_a_second_time_input_only_for_average_velocity_models(tmp_path):
    """cfm models keep exactly their weights (no extra module, the same draws); a two-time
    model shares them, adds a gap embedding, reads gap=None as 0, and saves and loads as such."""
    torch.manual_seed(0)
    plain = small()
    torch.manual_seed(0)
    two = small(two_times=True)
    extra = set(two.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("h_embedder.") for k in extra)
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in plain.state_dict().items())
    two = perturbed(two)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    assert two(x, t, y).shape == x.shape
    torch.testing.assert_close(two(x, t, y), two(x, t, y, gap=torch.zeros(3)))
    assert not torch.allclose(two(x, t, y, gap=torch.full((3,), 0.5)), two(x, t, y))
    two.save_pretrained(tmp_path / "m")
    again = DiT.from_pretrained(tmp_path / "m")
    assert again.config.two_times and torch.equal(again(x, t, y, gap=t), two(x, t, y, gap=t))


def test_guidance_as_an_input_only_for_average_velocity_models_that_ask(tmp_path):
    """A model built with a guidance_range shares every other weight with one without, reads
    guidance=None as 1 (unguided), answers to the scale, and saves and loads as such."""
    torch.manual_seed(0)
    two = small(two_times=True)
    torch.manual_seed(0)
    guided = small(two_times=True, guidance_range=[1.0, 2.5])
    extra = set(guided.state_dict()) - set(two.state_dict())
    assert extra and all(k.startswith("w_embedder.") for k in extra)
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in two.state_dict().items())
    guided = perturbed(guided)
    x, t, y, gap = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10]), torch.full((3,), 0.5)
    torch.testing.assert_close(guided(x, t, y, gap=gap), guided(x, t, y, gap=gap, guidance=torch.ones(3)))
    assert not torch.allclose(guided(x, t, y, gap=gap, guidance=torch.full((3,), 2.0)), guided(x, t, y, gap=gap))
    guided.save_pretrained(tmp_path / "m")
    again = DiT.from_pretrained(tmp_path / "m")
    assert again.config.guidance_range == [1.0, 2.5]
    s = torch.tensor([1.2, 2.0, 1.0])
    assert torch.equal(again(x, t, y, gap=gap, guidance=s), guided(x, t, y, gap=gap, guidance=s))
    with pytest.raises(ValueError, match="guidance_range is for average-velocity models"):
        small(guidance_range=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"guidance_range must be \[lo, hi\] with 0 <= lo < hi, got \[2.0, 1.0\]"):
        small(two_times=True, guidance_range=[2.0, 1.0])


def test_on_a_cpu_the_composite_attention_runs_and_agrees_with_the_fused_kernel():
    """On a CPU the DiT runs timm's composite attention (the fused kernel trains 2x slower
    there in bf16 and has no forward-mode rule); both paths compute the same function, and
    the bench can still ask for the fused one."""
    import torch.autograd.forward_ad as fwAD

    model = perturbed(small(two_times=True))
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    composite = model(x, t, y)
    assert not any(block.attn.fused_attn for block in model.blocks)
    model.fused_attention = True
    fused = model(x, t, y)
    assert all(block.attn.fused_attn for block in model.blocks)
    torch.testing.assert_close(composite, fused)
    model.fused_attention = None
    with fwAD.dual_level():  # forward mode through the default path, with no fallback needed
        out = model(fwAD.make_dual(x, torch.randn_like(x)), t, y, gap=1 - t)
        assert fwAD.unpack_dual(out).tangent.abs().max() > 0


def test_off_a_cpu_the_fused_kernel_is_the_default():
    with torch.device("meta"):
        model = small()
        model(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert all(block.attn.fused_attn for block in model.blocks)
