"""A new user's own colour images, end to end and offline, through the commands only: a folder
of 3 classes with broken files in it -> ``train-vae`` -> a flow on that VAE -> ``sample`` by
class name -> a classifier of their own for ``evaluate`` -> ``export`` -> plain diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow.data.shapes import write_shapes_folder
from tests.conftest import run_main


def _data(root):
    return [
        "--set",
        "data.source=folder",
        "--set",
        f"data.path={root}",
        "--set",
        "data.max_items=null",
        "--set",
        "data.image_size=16",
        "--set",
        "data.skip_bad_images=true",
        "--set",
        "data.max_bad_fraction=0.1",
        "--set",
        "train.log_with=none",
    ]


@pytest.mark.slow
def test_colour_folder_trains_samples_evaluates_and_exports_in_colour(tmp_path):
    shapes = write_shapes_folder(tmp_path / "shapes", per_class=12, size=16, seed=1)
    (shapes / "circle" / "empty.png").write_bytes(b"")
    (shapes / "square" / "cut.png").write_bytes((shapes / "square" / "0000.png").read_bytes()[:40])
    (shapes / "triangle" / "notes.png").write_text("not an image")
    data = _data(shapes)
    vae = tmp_path / "vae"
    proc = run_main(
        "train-vae",
        "--config",
        "smoke",
        *data,
        "--set",
        "autoencoder.block_out_channels=[8, 8]",
        "--set",
        "autoencoder.batch_size=8",
        "--epochs",
        "2",
        "--output-dir",
        tmp_path / "runs",
        "--out",
        vae,
    )
    assert "skipped 3 bad file(s)" in proc.stdout and f"--set vae.pretrained={vae}" in proc.stdout
    assert json.loads((vae / "config.json").read_text())["in_channels"] == 3

    flow = [*data, "--set", f"vae.pretrained={vae}", "--set", "train.epochs=2", "--output-dir", tmp_path / "runs"]
    proc = run_main("--config", "smoke", *flow)
    assert "latents (4, 8, 8) of colour 16 px images" in proc.stdout
    run = next((tmp_path / "runs").glob("smoke+*"))
    grid = np.asarray(Image.open(run / "figures" / "final.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3

    # sample by class name; a name the data lacks is refused with the classes listed
    out = tmp_path / "two.png"
    run_main("sample", "--checkpoint", run, "--labels", "circle,triangle", "--num-samples", "4", "--out", out)
    assert np.asarray(Image.open(out)).shape[2] == 3
    wrong = run_main("sample", "--checkpoint", run, "--labels", "star", "--out", tmp_path / "x.png", check=False)
    assert wrong.returncode == 2 and "circle, square, triangle" in wrong.stderr and len(wrong.stderr.splitlines()) == 1

    # the digit net does not fit shapes: refused on the command line in one line
    digits = run_main("evaluate", "--checkpoint", run, "--feature-net", "digits", "--num-samples", "20", check=False)
    assert digits.returncode == 2 and "--feature-net digits" in digits.stderr and len(digits.stderr.splitlines()) == 1
    clf = tmp_path / "classifier"
    run_main("train-classifier", "--config", "smoke", *data, "--epochs", "2", "--out", clf)
    proc = run_main("evaluate", "--checkpoint", run, "--feature-net", clf, "--num-samples", "30")
    report = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert "accuracy" in proc.stdout and report["references"]["train"]["reference_images"] == 36  # 3 skipped
    # the run's data rules, with --set on top
    fewer = tmp_path / "fewer.json"
    run_main(
        "evaluate",
        "--checkpoint",
        run,
        "--feature-net",
        clf,
        "--num-samples",
        "30",
        "--set",
        "data.max_items=12",
        "--out",
        fewer,
    )
    assert json.loads(fewer.read_text())["references"]["train"]["reference_images"] == 12

    export = tmp_path / "export"
    run_main("export", "--checkpoint", run, "--out", export)
    from diffusers import DiffusionPipeline

    from latentflow import LatentFlowPipeline

    plain = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
    ours = LatentFlowPipeline.from_pretrained(export)
    a = plain(class_labels=["square", "circle"], generator=torch.Generator().manual_seed(3), output_type="np")
    b = ours(class_labels=["square", "circle"], generator=torch.Generator().manual_seed(3), output_type="np")
    assert a.images.shape == (2, 16, 16, 3) and np.array_equal(a.images, b.images)
