"""End to end through ``python main.py`` in a subprocess, as a user runs it."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import SMOKE, log_records, run_main

pytestmark = pytest.mark.slow


def test_smoke_run_writes_the_run_directory(smoke_run):
    _, run_dir, proc = smoke_run
    for rel in ("config.yaml", "log.jsonl", "figures/epoch_001.png", "figures/epoch_002.png", "figures/final.png",
                "figures/loss.png", "figures/loss_by_time.png", "checkpoints/step_00000008/model.safetensors",
                "checkpoints/step_00000008/ema.safetensors", "checkpoints/step_00000008/optimizer.pt",
                "checkpoints/step_00000008/rng.pt", "checkpoints/step_00000008/state.json",
                "export/model_index.json", "export/transformer/config.json", "export/vae/config.json",
                "export/experiment.yaml"):
        assert (run_dir / rel).is_file(), rel
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "DiT-Nano/2" and saved["train"]["epochs"] == 2
    epochs = log_records(run_dir, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2] and all(np.isfinite(e["loss"]) for e in epochs)
    assert all(len(e["loss_by_time"]) == 10 for e in epochs)
    output = proc.stdout + proc.stderr
    assert "epoch   1/2" in output and "epoch   2/2" in output
    assert "\r" not in output  # not a terminal: plain lines, no progress-bar redraws
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "state.json").read_text())
    # self-describing: backbone and constructor arguments, classes, latent shape, VAE identity
    assert state["model"]["class"] == "DiT" and state["model"]["config"]["hidden_size"] == 64
    assert state["num_classes"] == 10 and state["latent_shape"] == [4, 8, 8] and "@" in state["vae"]["identity"]


def test_sample_writes_npz_and_grid_from_an_export_a_run_or_a_checkpoint(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run_main("sample", "--checkpoint", run_dir / "export", "--num-samples", "6", "--labels", "3,7",
                    "--solver", "euler", "--steps", "3", "--seed", "1", "--out", tmp_path / "s.npz")
    assert "NFE 3" in proc.stdout
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["images"].shape == (6, 32, 32, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "s.png").is_file()
    # the newest checkpoint holds the same EMA weights as the export: the same images
    run_main("sample", "--checkpoint", run_dir / "checkpoints" / "step_00000008", "--num-samples", "6", "--labels",
             "3,7", "--solver", "euler", "--steps", "3", "--seed", "1", "--out", tmp_path / "c.npz")
    assert np.array_equal(np.load(tmp_path / "c.npz")["images"], arrays["images"])
    again = run_main("sample", "--checkpoint", run_dir, "--num-samples", "6", "--out", tmp_path / "s.png", check=False)
    assert again.returncode == 2 and "already exist" in again.stderr  # never overwrites silently


def test_sample_writes_under_the_run_by_default(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run_main("sample", "--checkpoint", run_dir, "--num-samples", "4", "--trajectory", "4", cwd=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing in the current directory
    written = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert written == ["euler-2-cfg1.5-n4-seed0.npz", "euler-2-cfg1.5-n4-seed0.png",
                       "euler-2-cfg1.5-n4-seed0_trajectory.png"], proc.stdout


def test_evaluate_reports_fd_accuracy_and_settings(smoke_run):
    _, run_dir, _ = smoke_run
    proc = run_main("evaluate", "--checkpoint", run_dir / "export", "--num-samples", "40", "--solver", "heun",
                    "--steps", "2", "--cfg-scale", "2")
    assert "FD " in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-n40-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["num_samples"] == 40
    assert report["settings"]["cfg_scale"] == 2 and 0 <= report["accuracy"] <= 1
    train = report["references"]["train"]
    assert train["fd"] > 0 and train["ratio"] > 1  # a 2-epoch model is worse than held-out real digits
    assert set(report["references"]) == {"train", "held-out"}
    assert report["feature_net_test_accuracy"] >= 0.97


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--set", "train.lr=.inf"], "train.lr must be a finite number, got inf"),
        (["--set", "model.name=DiT-S/16"], "not a registered model"),
        (["--resume", "/does/not/exist"], "no such directory"),
        (["--set", "data.source=npz", "--set", "data.path=missing.npz"], "missing.npz not found"),
        (["--set", "vae.pretrained=./no-vae-here"], "VAE directory ./no-vae-here not found"),
        (["--set", "model.name=DiT-Nano/8", "--set", "data.image_size=48"], "patch size 8 does not divide the latent size 12"),
        (["--set", "data.image_size=4096"], "set data.image_size to at most 56"),
        (["sample", "--checkpoint", "nowhere", "--out", "x.png"], "no such directory"),
        (["launch", "--num_processes", "1", "--", "--set", "train.lr=nan"], "train.lr must be a finite number"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tmp_path, args, message):
    if args[0] in ("sample", "launch"):
        proc = run_main(*args, check=False, cwd=tmp_path)
    else:
        proc = run_main(*args, "--output-dir", tmp_path, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_every_subcommand_has_help_with_an_example():
    from latentflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.epilog and "example:" in p.epilog and "python main.py" in p.epilog, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings}"


def test_export_command_makes_a_pipeline_from_a_checkpoint(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    run_main("export", "--checkpoint", run_dir / "checkpoints" / "step_00000004", "--out", tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    again = run_main("export", "--checkpoint", run_dir, "--out", tmp_path / "pipe", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_default_experiment_file_trains_in_a_clean_directory(tmp_path):
    """`--config` is optional: main.py finds experiments/default.yaml from any directory."""
    proc = run_main("--set", "data.max_items=32", "--set", "train.epochs=1", "--set", "model.name=DiT-Nano/2",
                    "--set", "sampler.grid_per_class=1", "--output-dir", tmp_path / "runs", cwd=tmp_path)
    assert "default+data.max_items=32+model.name=DiT-Nano_2+sampler.grid_per_class=1-" in proc.stdout
    assert log_records(next((tmp_path / "runs").iterdir()), "start")[0]["overrides"] == [
        "data.max_items=32", "train.epochs=1", "model.name=DiT-Nano/2", "sampler.grid_per_class=1"]


def test_tensorboard_events_hold_the_losses_and_the_grid(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = smoke_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "epoch/loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Images("grid")] == [4, 8]  # one grid per epoch


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = run_main("--config", SMOKE, "--set", "train.log_with=wandb", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: train.log_with is 'wandb' but the wandb package is not installed; "
                                   "`pip install wandb`, or set train.log_with to another tracker or 'none'")
