import time

import pytest
import torch

from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.errors import LatentflowError
from latentflow.vae import EMBEDDED_VAE, FrozenVAE
from tests.conftest import make_tiny_vae


def test_round_trip_through_a_saved_autoencoder(tiny_vae_dir):
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    # scale, shift and geometry come from the saved config, not from literals
    assert vae.scaling_factor == pytest.approx(0.7) and vae.shift_factor == pytest.approx(0.1)
    assert vae.downsample == 4 and vae.latent_shape(32) == (4, 8, 8)
    assert not vae.autoencoder.training
    assert not any(p.requires_grad for p in vae.autoencoder.parameters())
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (3, 4, 8, 8) and (std > 0).all()
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(vae.unscale(vae.scale(z)), z)
    torch.testing.assert_close(vae.scale(z), (z - 0.1) * 0.7)
    images = vae.decode(vae.scale(mean))
    assert images.shape == (3, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, vae.autoencoder.decode(mean).sample.clamp(-1, 1))


def test_per_channel_statistics_in_the_config_are_used(tmp_path):
    """latents_mean/latents_std (diffusers' SDXL convention) normalise each channel."""
    from diffusers import AutoencoderKL

    path = make_tiny_vae(tmp_path / "pc")
    auto = AutoencoderKL.from_pretrained(path)
    mean, std = [1.0, -2.0, 0.5, 3.0], [2.0, 0.5, 1.0, 4.0]
    auto.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    auto.save_pretrained(path)
    vae = FrozenVAE.from_pretrained(str(path))
    z = torch.tensor(mean).view(1, 4, 1, 1) + torch.tensor(std).view(1, 4, 1, 1) * torch.randn(4096, 4, 2, 2)
    x = vae.scale(z)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(4), atol=0.05, rtol=0)
    torch.testing.assert_close(vae.unscale(x), z, atol=1e-5, rtol=1e-5)


def test_identity_follows_the_weights(tmp_path, tiny_vae_dir):
    a = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    assert a.identity == FrozenVAE.from_pretrained(str(tiny_vae_dir)).identity
    other = make_tiny_vae(tmp_path / "other", seed=1)
    assert FrozenVAE.from_pretrained(str(other)).identity != a.identity


def test_image_size_must_fit_the_downsampling(tiny_vae_dir):
    with pytest.raises(LatentflowError, match="not divisible by the VAE's downsampling factor 4"):
        FrozenVAE.from_pretrained(str(tiny_vae_dir)).latent_shape(30)


def test_missing_directory_and_unreachable_hub_fail_in_one_line(tmp_path):
    with pytest.raises(LatentflowError, match="VAE directory ./nowhere not found"):
        FrozenVAE.from_pretrained("./nowhere")
    start = time.perf_counter()
    with pytest.raises(LatentflowError, match="Hub is unreachable.*vae.pretrained=DIR"):
        FrozenVAE.from_pretrained("stabilityai/sd-vae-ft-ema")
    assert time.perf_counter() - start < 20
    (tmp_path / "notavae").mkdir()
    (tmp_path / "notavae" / "readme.txt").write_text("hi")
    with pytest.raises(LatentflowError, match="notavae has no config.json; it needs config.json and"):
        FrozenVAE.from_pretrained(str(tmp_path / "notavae"))
    with pytest.raises(LatentflowError, match="is a file; give the directory that save_pretrained wrote"):
        FrozenVAE.from_pretrained(str(tmp_path / "notavae" / "readme.txt"))


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path):
    """Another VAE's weights under this config.json: the mismatch named, not diffusers' advice."""
    import json
    import shutil

    a, b = make_tiny_vae(tmp_path / "a"), make_tiny_vae(tmp_path / "b", channels=(8, 16, 16))
    shutil.copy(b / "diffusion_pytorch_model.safetensors", a / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LatentflowError) as info:
        FrozenVAE.from_pretrained(str(a))
    assert "cannot be loaded: the shape of" in str(info.value) and "low_cpu_mem_usage" not in str(info.value)
    config = json.loads((b / "config.json").read_text())
    with pytest.raises(LatentflowError, match="has no subfolder 'vae'"):
        FrozenVAE.from_pretrained(str(b), subfolder="vae")
    assert config["in_channels"] == 1


def test_embedded_vae_reconstructs_held_out_digits():
    """The shipped VAE: loads through from_pretrained, embeds held-out digits at >= 30 dB."""
    from latentflow.metrics import psnr

    assert (EMBEDDED_VAE / "config.json").is_file()
    vae = FrozenVAE.from_pretrained("embedded")
    test = build_dataset(DataConfig(split="test", max_items=100), channels=vae.in_channels)
    x = torch.stack([test[i][0] for i in range(len(test))])
    mean, _ = vae.encode(x)
    recon = vae.autoencoder.decode(mean).sample.clamp(-1, 1)
    assert psnr(recon, x).mean() >= 30.0
    scaled = vae.scale(mean)  # every channel about zero mean, unit variance
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 0.25
    assert ((scaled.std(dim=(0, 2, 3)) - 1).abs() < 0.25).all()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"latents_mean": [0.0, 0.0], "latents_std": [1.0] * 4}, "latents_mean has 2 values for 4 latent channels"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std must be finite and > 0"),
        ({"scaling_factor": 0.0}, "must be finite and the scale non-zero"),
    ],
)
def test_bad_latent_statistics_in_the_config_are_one_line(tmp_path, values, message):
    from diffusers import AutoencoderKL

    path = make_tiny_vae(tmp_path / "bad")
    auto = AutoencoderKL.from_pretrained(path)
    auto.register_to_config(**values)
    auto.save_pretrained(path)
    with pytest.raises(LatentflowError, match=message):
        FrozenVAE.from_pretrained(str(path))
