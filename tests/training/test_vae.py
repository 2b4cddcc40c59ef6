"""train-vae's trainer (``training/vae.py``) on small generated data: colour kept, held-out
scores, latent statistics ready for ``vae.pretrained``, exact resume, damaged checkpoints
passed over, and settings refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentflow.config import load_config
from latentflow.console import Console
from latentflow.data.shapes import write_shapes_folder
from latentflow.errors import CheckpointError, ConfigError, DataError
from latentflow.training.vae import VAEOptions, train_autoencoder
from latentflow.vae import FrozenVAE

SETTINGS = [
    "data.image_size=16",
    "autoencoder.block_out_channels=[8, 8]",
    "autoencoder.batch_size=8",
    "autoencoder.held_out=0.2",
    "train.log_with=none",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=8, size=16)


def colour_cfg(root, *more):
    return load_config("smoke", ["data.source=folder", f"data.path={root}", "data.max_items=null", *SETTINGS, *more])


class Heard(Console):
    def __init__(self):
        self.lines = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def weights(out: Path):
    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def test_a_colour_folder_gives_a_colour_vae_with_latent_statistics_and_held_out_scores(shapes, tmp_path):
    report = train_autoencoder(colour_cfg(shapes, "autoencoder.epochs=2"), VAEOptions(output_dir=tmp_path))
    out = Path(report["out"])
    config = json.loads((out / "config.json").read_text())
    assert config["in_channels"] == 3 and config["out_channels"] == 3  # colour in, colour out
    assert len(config["latents_mean"]) == 4 and all(s > 0 for s in config["latents_std"])
    assert report["data"].endswith("19 training / 5 held-out images")  # 24 images, 20 % held out
    assert set(report["held_out"]) >= {"psnr", "ssim"} and report["held_out"]["psnr"] > 5
    vae = FrozenVAE.from_pretrained(str(out))  # usable as vae.pretrained=OUT
    assert vae.in_channels == 3 and vae.latent_shape(16) == (4, 8, 8)
    figure = np.asarray(Image.open(out / "reconstructions.png"))
    assert figure.ndim == 3 and figure.shape[2] == 3
    run = out.parent
    assert run.name.startswith("smoke-vae-") and (run / "config.yaml").is_file()
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_continues_exactly_and_passes_over_a_damaged_checkpoint(shapes, tmp_path):
    cfg = colour_cfg(shapes, "autoencoder.epochs=2")
    straight = train_autoencoder(cfg, VAEOptions(output_dir=tmp_path / "a"))
    run = Path(train_autoencoder(cfg, VAEOptions(output_dir=tmp_path / "b"))["run"])
    # damage the newest checkpoint: a resume takes the one before it, says so, and trains the
    # last epoch again to the same weights as the run that went straight through
    newest = sorted((run / "checkpoints").glob("vae_step_*"))[-1]
    (newest / "autoencoder.safetensors").write_bytes(b"\0" * 64)
    heard = Heard()
    resumed = train_autoencoder(cfg, VAEOptions(output_dir=tmp_path / "b", resume="latest"), heard)
    assert any("passing over" in line and newest.name in line for line in heard.lines)
    # the damaged one is kept aside, and the epoch trained again wrote an intact one in its place
    assert list((run / "checkpoints").glob("set-aside-*/" + newest.name))
    assert (newest / "autoencoder.safetensors").stat().st_size > 64
    assert resumed["run"] == str(run) and resumed["steps"] == 2  # one epoch of 19 // 8 steps
    a, b = weights(Path(straight["out"])), weights(Path(resumed["out"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # more epochs continue it; another experiment is refused, not retrained
    longer = train_autoencoder(colour_cfg(shapes, "autoencoder.epochs=3"), VAEOptions(resume=str(run)))
    assert longer["steps"] == 2 and [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    with pytest.raises(CheckpointError, match="data.image_size"):
        train_autoencoder(colour_cfg(shapes, "data.image_size=32"), VAEOptions(resume=str(run)))


def test_bad_settings_and_data_are_refused_in_one_line(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"block_out_channels \[12, 16\]: each must be a multiple of 12"):
        colour_cfg(shapes, "autoencoder.block_out_channels=[12, 16]")
    with pytest.raises(ConfigError, match="autoencoder.held_out must lie in"):
        colour_cfg(shapes, "autoencoder.held_out=0.9")
    tiny = write_shapes_folder(tmp_path / "one", per_class=1, size=16, shapes=["circle"])
    with pytest.raises(DataError, match="too few to hold some out"):
        train_autoencoder(colour_cfg(tiny), VAEOptions(output_dir=tmp_path))
    broken = write_shapes_folder(tmp_path / "broken", per_class=4, size=16)
    (broken / "circle" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.png: .*skip_bad_images"):
        train_autoencoder(colour_cfg(broken), VAEOptions(output_dir=tmp_path))
