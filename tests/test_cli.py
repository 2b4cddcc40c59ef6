"""End to end through ``python main.py`` in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def run(*args, cwd=None, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke training run, shared by the tests below."""
    out = tmp_path_factory.mktemp("runs")
    proc = run("--config", SMOKE, "--output-dir", str(out), "--cache-dir", str(out / "cache"))
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("smoke-")]
    return out, run_dir, proc


def test_smoke_run_writes_the_run_directory(smoke_run):
    _, run_dir, proc = smoke_run
    for rel in ("config.yaml", "log.jsonl", "figures/epoch_001.png", "figures/epoch_002.png", "figures/final.png",
                "figures/loss.png", "figures/loss_by_time.png", "checkpoints/epoch_0002/model.safetensors", "checkpoints/epoch_0002/ema.safetensors",
                "checkpoints/epoch_0002/optimizer.pt", "export/model.safetensors", "export/config.yaml"):
        assert (run_dir / rel).is_file(), rel
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "DiT-Nano/2" and saved["train"]["epochs"] == 2
    epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(np.isfinite(e["loss"]) for e in epochs)
    assert all(len(e["loss_by_time"]) == 10 for e in epochs)
    assert "epoch   1/2" in proc.stdout + proc.stderr and "epoch   2/2" in proc.stdout + proc.stderr


def test_resume_continues_the_same_run(smoke_run):
    out, run_dir, _ = smoke_run
    proc = run("--config", SMOKE, "--output-dir", str(out), "--cache-dir", str(out / "cache"),
               "--resume", "latest", "--set", "train.epochs=3")
    assert f"resuming {run_dir} from epoch 2" in proc.stdout + proc.stderr
    assert "using latent cache" in proc.stdout + proc.stderr  # the cache from the first run
    assert (run_dir / "figures" / "epoch_003.png").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    state = json.loads((run_dir / "checkpoints" / "epoch_0003" / "state.json").read_text())
    first = json.loads((run_dir / "checkpoints" / "epoch_0002" / "state.json").read_text())
    assert state["step"] == first["step"] + 4  # 64 items / batch 16: the step count carries on
    assert len([p for p in out.iterdir() if p.name.startswith("smoke-")]) == 1


def test_sample_writes_npz_and_grid(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run("sample", "--checkpoint", str(run_dir / "export"), "--num-samples", "6", "--labels", "3,7",
               "--solver", "euler", "--steps", "3", "--seed", "1", "--out", str(tmp_path / "s.npz"))
    assert "NFE 3" in proc.stdout
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["images"].shape == (6, 32, 32, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "s.png").is_file()
    again = run("sample", "--checkpoint", str(run_dir), "--num-samples", "6", "--out", str(tmp_path / "s.png"), check=False)
    assert again.returncode == 2 and "already exist" in again.stderr  # never overwrites silently


def test_evaluate_reports_fd_accuracy_and_settings(smoke_run):
    _, run_dir, _ = smoke_run
    proc = run("evaluate", "--checkpoint", str(run_dir / "export"), "--num-samples", "40", "--solver", "heun",
               "--steps", "2", "--cfg-scale", "2")
    assert "FD " in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-n40-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["num_samples"] == 40
    assert report["settings"]["cfg_scale"] == 2 and 0 <= report["accuracy"] <= 1
    assert report["fd"] > report["real_fd"] > 0  # a 2-epoch model is worse than real digits
    assert report["classifier_test_accuracy"] >= 0.97


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--set", "model.name=DiT-S/16"], "not a registered model"),
        (["--resume", "/does/not/exist"], "no such directory"),
        (["--set", "data.source=npz", "--set", "data.path=missing.npz"], "missing.npz not found"),
        (["--set", "vae.pretrained=./no-vae-here"], "VAE directory ./no-vae-here not found"),
        (["--set", "model.name=DiT-Nano/8", "--set", "data.image_size=48"], "patch size 8 does not divide the latent size 12"),
        (["sample", "--checkpoint", "nowhere", "--out", "x.png"], "no such directory"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tmp_path, args, message):
    proc = run(*args, "--output-dir", str(tmp_path), check=False, cwd=tmp_path) if args[0] != "sample" else run(*args, check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
