import pytest
import torch

from latentflow.models import MODELS, create_model, model_from_config
from latentflow.models.unet import UNet
from tests.conftest import SMOKE, log_records, run_main, the_run


def perturbed(name="UNet-S", **kw):
    torch.manual_seed(0)
    m = create_model(name, sample_size=8, in_channels=4, num_classes=10, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def test_presets_are_registered_and_start_at_zero_velocity():
    assert {"UNet-S", "UNet-B", "UNet-L"} <= set(MODELS)
    m = create_model("UNet-S", sample_size=8, in_channels=4, num_classes=10)
    out = m(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0


def test_zero_label_null_label_and_none():
    m = perturbed()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    null = m(x, t, torch.full((4,), 10))
    assert torch.equal(m(x, t, None), null)  # no labels is the null label
    zero = m(x, t, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(zero, null)  # class 0 is a class, not "no label"
    assert not torch.allclose(m(x, t, torch.full((4,), 3)), zero)
    assert not torch.allclose(m(x, t.flip(0), torch.full((4,), 3)), m(x, t, torch.full((4,), 3)))  # time matters


def test_it_describes_itself_and_refuses_latents_it_cannot_halve(tmp_path):
    m = perturbed()
    m.save_pretrained(tmp_path / "u")
    again = UNet.from_pretrained(tmp_path / "u")
    rebuilt = model_from_config("UNet", dict(m.config)).eval()
    rebuilt.load_state_dict(m.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(again(x, t, y), m(x, t, y)) and torch.equal(rebuilt(x, t, y), m(x, t, y))
    with pytest.raises(ValueError, match="does not divide 6"):
        create_model("UNet-L", sample_size=6, in_channels=4, num_classes=10)


@pytest.mark.slow
def test_a_unet_trains_samples_and_exports_through_main_py(tmp_path):
    run_main("--config", SMOKE, "--set", "model.name=UNet-S", "--set", "train.epochs=1", "--output-dir", tmp_path)
    run = the_run(tmp_path)
    assert log_records(run, "epoch")[0]["step"] == 4
    proc = run_main(
        "sample",
        "--checkpoint",
        run,
        "--labels",
        "0,1",
        "--num-samples",
        "4",
        "--cfg-scale",
        "2",
        "--out",
        tmp_path / "s.png",
    )
    assert "NFE 2" in proc.stdout
    index = (run / "export" / "model_index.json").read_text()
    assert '"latentflow.models.unet"' in index and '"UNet"' in index


def test_a_second_time_input_only_for_average_velocity_models(tmp_path):
    torch.manual_seed(0)
    plain = create_model("UNet-S", sample_size=8, in_channels=4, num_classes=10)
    torch.manual_seed(0)
    two = create_model("UNet-S", sample_size=8, in_channels=4, num_classes=10, two_times=True)
    shared = {k.replace("class_embedding.labels.", "class_embedding."): v for k, v in two.state_dict().items()}
    assert all(torch.equal(v, shared[k]) for k, v in plain.state_dict().items())  # cfm weights as they were
    two = perturbed(two_times=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    torch.testing.assert_close(two(x, t, y), two(x, t, y, gap=torch.zeros(3)))
    assert not torch.allclose(two(x, t, y, gap=torch.full((3,), 0.5)), two(x, t, y))
    two.save_pretrained(tmp_path / "m")
    again = model_from_config("UNet", dict(UNet.load_config(tmp_path / "m")))
    again.load_state_dict(two.state_dict())
    torch.testing.assert_close(again.eval()(x, t, y, gap=t), two(x, t, y, gap=t))


def test_guidance_as_an_input_joins_the_label_and_the_gap(tmp_path):
    torch.manual_seed(0)
    two = create_model("UNet-S", sample_size=8, in_channels=4, num_classes=10, two_times=True)
    torch.manual_seed(0)
    guided = create_model("UNet-S", sample_size=8, in_channels=4, num_classes=10, two_times=True, guidance_range=[1, 2])
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in two.state_dict().items())  # built last
    guided = perturbed(two_times=True, guidance_range=[1, 2])
    x, t, y, gap = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10]), torch.full((3,), 0.5)
    torch.testing.assert_close(guided(x, t, y, gap=gap), guided(x, t, y, gap=gap, guidance=torch.ones(3)))
    assert not torch.allclose(guided(x, t, y, gap=gap, guidance=torch.full((3,), 2.0)), guided(x, t, y, gap=gap))
    guided.save_pretrained(tmp_path / "m")
    again = model_from_config("UNet", dict(UNet.load_config(tmp_path / "m")))
    again.load_state_dict(guided.state_dict())
    s = torch.tensor([1.5, 2.0, 1.0])
    torch.testing.assert_close(again.eval()(x, t, y, gap=gap, guidance=s), guided(x, t, y, gap=gap, guidance=s))
