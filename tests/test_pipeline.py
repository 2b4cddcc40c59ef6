"""LatentFlowPipeline: a diffusers pipeline of the trained model and its VAE."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow import LatentFlowPipeline
from latentflow.config import ExperimentConfig
from latentflow.errors import CheckpointError, LatentflowError
from latentflow.files import file_sha256
from latentflow.models import create_model
from latentflow.pipeline import load_pipeline, pipeline_from_parts, save_pipeline
from latentflow.vae import FrozenVAE
from tests.conftest import run_main


@pytest.fixture(scope="module")
def pipe(tiny_vae_dir):
    torch.manual_seed(0)
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = ExperimentConfig()
    cfg.sampler.solver, cfg.sampler.steps, cfg.sampler.guidance_interval = "euler", 3, [0.1, 0.9]
    return pipeline_from_parts(model.eval(), FrozenVAE.from_pretrained(str(tiny_vae_dir)), cfg)


def test_save_and_load_round_trip(pipe, tmp_path):
    save_pipeline(pipe, tmp_path / "p", ExperimentConfig(), {"step": 1})
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["latentflow.models.dit", "DiT"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["solver"] == "euler" and index["num_inference_steps"] == 3 and index["guidance_interval"] == [0.1, 0.9]
    assert len(index["latents_scale"]) == 4  # the latent normalisation travels with the pipeline
    loaded = LatentFlowPipeline.from_pretrained(tmp_path / "p")
    for a, b in zip(pipe.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    gen = lambda: torch.Generator().manual_seed(3)
    a = pipe(class_labels=[3, 7], generator=gen(), output_type="np").images
    b = loaded(class_labels=[3, 7], generator=gen(), output_type="np").images
    assert a.shape == (2, 32, 32, 1) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)


def test_call_options(pipe):
    out = pipe(
        class_labels=[3, 7], num_inference_steps=2, guidance_scale=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert len(out.images) == 2 and isinstance(out.images[0], Image.Image) and out.images[0].mode == "L"
    assert out.nfe == 2 and out.labels.tolist() == [3, 7]
    uncond = pipe(class_labels=None, num_images=3, solver="heun", num_inference_steps=2)
    assert len(uncond.images) == 3 and uncond.nfe == 4 and uncond.labels.tolist() == [-1, -1, -1]
    cycled = pipe(class_labels=5, num_images=4, output_type="latent")
    assert cycled.images.shape == (4, 4, 8, 8) and cycled.labels.tolist() == [5, 5, 5, 5]
    (images,) = pipe(class_labels=[1], return_dict=False)
    assert len(images) == 1
    with pytest.raises(LatentflowError, match="out of range 0..9"):
        pipe(class_labels=[12])
    with pytest.raises(LatentflowError, match="solver 'rk45'"):
        pipe(class_labels=[1], solver="rk45")


@pytest.mark.slow
def test_pipeline_images_equal_main_py_sample(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    run_main(
        "sample",
        "--checkpoint",
        run_dir / "export",
        "--labels",
        "3,7",
        "--num-samples",
        "4",
        "--seed",
        "5",
        "--steps",
        "3",
        "--cfg-scale",
        "1.5",
        "--out",
        tmp_path / "s.npz",
    )
    expected = np.load(tmp_path / "s.npz")["images"]
    pipe = LatentFlowPipeline.from_pretrained(run_dir / "export")
    out = pipe(
        class_labels=[3, 7],
        num_images=4,
        num_inference_steps=3,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(5),
    )
    assert np.array_equal(np.stack([np.asarray(im) for im in out.images])[..., None], expected)


@pytest.mark.slow
def test_an_export_of_an_earlier_release_is_still_read(smoke_run, tmp_path):
    """Format 1: EMA weights + config.yaml + export.json; read as a pipeline on the fly."""
    from safetensors.torch import save_file

    _, run_dir, _ = smoke_run
    pipe = LatentFlowPipeline.from_pretrained(run_dir / "export")
    old = tmp_path / "old-export"
    old.mkdir()
    save_file(pipe.transformer.state_dict(), str(old / "model.safetensors"))
    (old / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    identity = json.loads((run_dir / "checkpoints" / "step_00000008" / "state.json").read_text())["vae"]["identity"]
    (old / "export.json").write_text(
        json.dumps(
            {
                "model": "DiT-Nano/2",
                "latent_shape": [4, 8, 8],
                "num_classes": 10,
                "vae": "embedded",
                "vae_identity": identity,
                "epoch": 2,
                "step": 8,
            }
        )
    )
    converted = load_pipeline(old)
    gen = lambda: torch.Generator().manual_seed(0)
    assert np.array_equal(
        converted(class_labels=[1, 2], generator=gen(), output_type="np").images,
        pipe(class_labels=[1, 2], generator=gen(), output_type="np").images,
    )
    run_main("export", "--checkpoint", old, "--out", tmp_path / "new")  # and converted to the new format
    assert (tmp_path / "new" / "model_index.json").is_file()


@pytest.mark.slow
def test_a_changed_vae_or_diverged_weights_are_refused(smoke_run, tmp_path):
    import shutil

    from latentflow.vae import EMBEDDED_VAE

    _, run_dir, _ = smoke_run
    run = tmp_path / run_dir.name
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export", "samples", "eval"))
    vae = tmp_path / "vae"
    shutil.copytree(EMBEDDED_VAE, vae)
    config = (run / "config.yaml").read_text().replace("pretrained: embedded", f"pretrained: {vae}")
    (run / "config.yaml").write_text(config)
    from diffusers import AutoencoderKL

    auto = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        auto.decoder.conv_out.bias.add_(0.1)  # "regenerated in place"
    auto.save_pretrained(vae)
    with pytest.raises(
        CheckpointError, match=r"was trained with VAE embedded@\w+ but .*/vae is now vae@\w+; restore that VAE"
    ):
        load_pipeline(run)
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan-export"
    shutil.copytree(run_dir / "export", nan)
    weights = nan / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    next(iter(state.values())).fill_(float("nan"))
    save_file(state, str(weights))
    # exported so by a run that diverged: the recorded digests match the non-finite weights
    info = json.loads((nan / "latentflow.json").read_text())
    info["files"]["transformer/diffusion_pytorch_model.safetensors"] = file_sha256(weights)
    (nan / "latentflow.json").write_text(json.dumps(info))
    proc = run_main("sample", "--checkpoint", nan, "--out", tmp_path / "s.png", check=False)
    assert proc.returncode == 2 and "non-finite weights (its training diverged)" in proc.stderr
