"""Training reliability, through ``python main.py`` as users run it: exact resume after
SIGKILL, clean stops, non-finite steps, extension, one writer per run, a full disk. The
guarantees these check are listed in the README's "Reliability" section."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentflow.runs import checkpoints_of, latest_checkpoint, load_checkpoint
from tests.conftest import REPO, SMOKE, log_records, mount_tmpfs, popen, run_main, the_run, wait_for

# 256 digits, batch 16: 16 optimizer steps per epoch, 48 in all; a checkpoint every 3 steps.
EXACT = [
    "--config",
    SMOKE,
    "--mixed-precision",
    "no",
    "--set",
    "data.max_items=256",
    "--set",
    "train.epochs=3",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "train.keep_checkpoints=100",
]
FINAL_STEP = 48


def assert_same_final_state(run_a: Path, run_b: Path, final_step: int = FINAL_STEP):
    """Every tensor of the newest checkpoint: model, EMA, optimizer, RNG states, counters."""
    a, b = latest_checkpoint(run_a), latest_checkpoint(run_b)
    assert a.name == b.name == f"step_{final_step:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}:{key} differs"
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    oa, ob = ca["optimizer"]["optimizer"], cb["optimizer"]["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert torch.equal(value, ob["state"][i][key]), f"optimizer state {i}.{key} differs"
    ra, rb = ca["rng"]["ranks"], cb["rng"]["ranks"]
    assert len(ra) == len(rb) and all(torch.equal(x["torch"], y["torch"]) for x, y in zip(ra, rb))
    sa, sb = ca["state"]["train_state"], cb["state"]["train_state"]
    sa.pop("log_bytes"), sb.pop("log_bytes")  # the resumed log also has its 'resume' record
    assert sa == sb


def assert_log_has_no_duplicates(run_dir: Path):
    steps = [r["step"] for r in log_records(run_dir, "step")]
    epochs = [r["epoch"] for r in log_records(run_dir, "epoch")]
    assert steps == sorted(set(steps)) and epochs == sorted(set(epochs))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, from a cold latent cache."""
    out = tmp_path_factory.mktemp("reference")
    run_main(*EXACT, "--output-dir", out, "--cache-dir", out / "cache")
    return out, the_run(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 6], ids=["mid-epoch", "right-after-a-checkpoint"])
def test_sigkill_and_resume_is_bit_exact(reference, tmp_path, kill_at):
    out, ref_run = reference
    killed = run_main(
        *EXACT,
        "--output-dir",
        tmp_path,
        "--cache-dir",
        out / "cache",
        env={"LATENTFLOW_FAULTS": f"sigkill={kill_at}"},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    run = the_run(tmp_path)
    # killed after step 5 (the newest checkpoint is step 3's) or right after step 6's checkpoint
    assert latest_checkpoint(run).name == ("step_00000006" if kill_at == 6 else "step_00000003")
    proc = run_main(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    assert f"resuming {run} from" in proc.stdout and "took over the lock" in proc.stdout
    assert_same_final_state(ref_run, run)
    assert_log_has_no_duplicates(run)


@pytest.mark.slow
def test_sigkill_from_outside_at_an_arbitrary_moment(reference, tmp_path):
    out, ref_run = reference
    log = open(tmp_path / "out.log", "w")
    proc = popen(
        [
            sys.executable,
            str(REPO / "main.py"),
            *EXACT,
            "--output-dir",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(out / "cache"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(
        lambda: (tmp_path / "runs").is_dir() and any(checkpoints_of(r) for r in (tmp_path / "runs").iterdir()),
        what="a first checkpoint",
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_main(*EXACT, "--output-dir", tmp_path / "runs", "--cache-dir", out / "cache", "--resume", "latest")
    run = the_run(tmp_path / "runs")
    assert_same_final_state(ref_run, run)
    assert_log_has_no_duplicates(run)


@pytest.mark.slow
def test_cold_and_warm_cache_give_identical_weights(reference, tmp_path):
    out, ref_run = reference  # the reference encoded its cache; this run reads it
    proc = run_main(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache")
    assert "using latent cache" in proc.stdout
    assert_same_final_state(ref_run, the_run(tmp_path))


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(reference, tmp_path):
    out, ref_run = reference
    stopped = run_main(
        *EXACT,
        "--output-dir",
        tmp_path,
        "--cache-dir",
        out / "cache",
        env={"LATENTFLOW_FAULTS": "sigterm=7"},
        check=False,
    )
    assert stopped.returncode == 143
    run = the_run(tmp_path)
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped (SIGTERM) after optimizer step 8; checkpoint ")
    assert f"continue with: python main.py --config {SMOKE} " in last and last.endswith(f"--resume {run}")
    assert latest_checkpoint(run).name == "step_00000008"
    run_main(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", run)
    assert_same_final_state(ref_run, run)


@pytest.mark.slow
def test_external_sigterm_and_a_second_ctrl_c(tmp_path):
    """A real signal from outside: the run stops cleanly (143); a second Ctrl-C leaves at once
    (130) and what was saved stays loadable."""
    args = [
        sys.executable,
        str(REPO / "main.py"),
        "--config",
        SMOKE,
        "--set",
        "data.max_items=4500",
        "--set",
        "train.epochs=50",
        "--set",
        "train.checkpoint_every=40",
        "--set",
        "train.log_every=1",
        "--output-dir",
        str(tmp_path),
    ]
    for signals, code in (([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)):
        err = open(tmp_path / "err.log", "w")
        proc = popen(args + (["--resume", "latest"] if code == 130 else []), stdout=subprocess.DEVNULL, stderr=err)
        if code == 143:
            wait_for(lambda: any(checkpoints_of(r) for r in tmp_path.iterdir() if r.is_dir()), what="a checkpoint")
        else:  # training again after the resume

            def training_again():
                events = [r["event"] for r in log_records(the_run(tmp_path))]
                return "resume" in events and "step" in events[len(events) - events[::-1].index("resume") :]

            wait_for(training_again, what="a step after the resume")
        for sig in signals:
            os.kill(proc.pid, sig)
        start = time.time()
        assert proc.wait(timeout=60) == code
        text = (tmp_path / "err.log").read_text()
        if code == 143:
            assert "stopped (SIGTERM) after optimizer step" in text and "continue with:" in text
        else:
            assert time.time() - start < 30
    run = the_run(tmp_path)
    load_checkpoint(latest_checkpoint(run))  # complete and loadable


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_kept_across_a_resume(reference, tmp_path):
    out, _ = reference
    faults = {"LATENTFLOW_FAULTS": "nonfinite=2,3;sigkill=6"}  # attempts 2 and 3 are skipped
    killed = run_main(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", env=faults, check=False)
    assert killed.returncode == -signal.SIGKILL
    run = the_run(tmp_path)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())["train_state"]
    assert state["nonfinite_total"] == 2 and state["step"] == 6 and state["iteration"] == 8
    run_main(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    epochs = log_records(run, "epoch")
    assert [e["nonfinite_steps"] for e in epochs] == [2, 2, 2]
    assert epochs[-1]["step"] == FINAL_STEP - 2 and epochs[0]["good_steps"] == 14


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    proc = run_main(
        "--config",
        SMOKE,
        "--set",
        "train.max_nonfinite=3",
        "--output-dir",
        tmp_path,
        env={"LATENTFLOW_FAULTS": "nonfinite=5,6,7,8"},
        check=False,
    )
    assert proc.returncode == 2
    assert "non-finite for 3 steps in a row" in proc.stderr and "last good checkpoint: " in proc.stderr
    assert "step_00000004" in proc.stderr  # the epoch-1 checkpoint, named as the one to go back to


@pytest.mark.slow
def test_an_epoch_of_only_skipped_steps_ends_the_run_without_an_export(tmp_path):
    proc = run_main(
        "--config", SMOKE, "--output-dir", tmp_path, env={"LATENTFLOW_FAULTS": "nonfinite=1,2,3,4"}, check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: every step of epoch 1 was ")
    run = the_run(tmp_path)
    assert not (run / "export").exists() and not log_records(run, "epoch")


@pytest.mark.slow
def test_non_finite_weights_end_the_run_with_an_error_and_no_export(tmp_path):
    proc = run_main(
        "--config", SMOKE, "--output-dir", tmp_path, env={"LATENTFLOW_FAULTS": "nan_weights=6"}, check=False
    )
    assert proc.returncode == 2 and "weights became non-finite by optimizer step 6" in proc.stderr
    run = the_run(tmp_path)
    assert [s for s, _ in checkpoints_of(run)] == [4] and not (run / "export").exists()
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_00000004'}" in proc.stderr


@pytest.mark.slow
def test_resume_extends_a_finished_run_and_refuses_another_experiment(reference, tmp_path):
    out, ref_run = reference
    run = tmp_path / ref_run.name
    shutil.copytree(ref_run, run)
    extend = run_main(*EXACT, "--set", "train.epochs=4", "--cache-dir", out / "cache", "--resume", run)
    assert "changed train.epochs: 3 -> 4" in extend.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4
    assert latest_checkpoint(run).name == "step_00000064"
    assert json.loads((run / "export" / "latentflow.json").read_text())["epoch"] == 4
    done = run_main(*EXACT, "--set", "train.epochs=4", "--cache-dir", out / "cache", "--resume", run)
    assert "has finished all 4 epochs; nothing to do" in done.stdout and "--set train.epochs=N" in done.stdout
    other = run_main(*EXACT, "--set", "flow.sigma_min=0.01", "--resume", run, check=False)
    assert other.returncode == 2 and "it was trained with flow.sigma_min=0.001" in other.stderr


@pytest.mark.slow
def test_resume_latest_finds_only_runs_of_exactly_this_experiment(reference, tmp_path):
    out, ref_run = reference
    shutil.copytree(ref_run, tmp_path / ref_run.name)
    # the same experiment without the overrides that changed what it trains: refused, not a fresh run
    proc = run_main(
        "--config", SMOKE, "--resume", "latest", "--output-dir", tmp_path, "--set", "train.epochs=1", check=False
    )
    assert proc.returncode == 2 and "the newest run of experiment 'smoke'" in proc.stderr
    assert "data.max_items=256" in proc.stderr and "drop the --set overrides that differ" in proc.stderr
    assert len(list(tmp_path.iterdir())) == 1  # no new run
    other = run_main("--config", SMOKE, "--resume", "latest", "--output-dir", tmp_path / "elsewhere")
    assert "no checkpoint of experiment 'smoke'" in other.stdout and "starting fresh" in other.stdout


@pytest.mark.slow
def test_a_run_being_trained_cannot_be_resumed_twice(reference, tmp_path):
    out, _ = reference
    args = [
        *EXACT,
        "--set",
        "data.max_items=4500",
        "--set",
        "train.epochs=50",
        "--output-dir",
        tmp_path,
        "--cache-dir",
        out / "cache",
    ]
    first = popen(
        [sys.executable, str(REPO / "main.py"), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: any(checkpoints_of(r) for r in tmp_path.iterdir() if r.is_dir()), what="a checkpoint")
        second = run_main(*args, "--resume", "latest", check=False)
        assert second.returncode == 2 and f"is being trained by pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    third = run_main(*args, "--resume", "latest", env={"LATENTFLOW_FAULTS": "sigkill=200"}, check=False)
    assert f"took over the lock of pid {first.pid}" in third.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A real 5 MB tmpfs."""
    unmount = mount_tmpfs(tmp_path / "disk", "5m")
    yield tmp_path / "disk"
    unmount()


@pytest.mark.slow
def test_a_real_full_disk_during_training_keeps_earlier_checkpoints(reference, tmp_path, small_disk):
    out, _ = reference
    args = [*EXACT, "--set", "train.keep_checkpoints=2", "--output-dir", small_disk, "--cache-dir", out / "cache"]
    proc = run_main(*args, check=False)  # a checkpoint is 2.8 MB: the second does not fit in 5 MB
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write checkpoint ") and "No space left on device" in line
    assert "earlier checkpoints are intact" in line and "needs about" in line
    run = the_run(small_disk)
    load_checkpoint(latest_checkpoint(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries
    assert [s for s, _ in checkpoints_of(run)] == [3]
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    run_main(*args, "--resume", "latest")
    assert latest_checkpoint(run).name == f"step_{FINAL_STEP:08d}"


@pytest.mark.slow
def test_a_full_or_read_only_cache_directory_is_one_line(tmp_path, small_disk):
    # 4 500 digits: 9 MB of moments for a 5 MB disk
    full = run_main(
        "--config",
        SMOKE,
        "--set",
        "data.max_items=4500",
        "--output-dir",
        tmp_path,
        "--cache-dir",
        small_disk,
        check=False,
    )
    assert full.returncode == 2 and "could not write latent cache" in full.stderr and "No space left" in full.stderr
    assert not list(small_disk.rglob(".*.tmp-*"))  # no half-written shard left behind (complete ones are kept)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    readonly = run_main("--config", SMOKE, "--output-dir", tmp_path, "--cache-dir", small_disk, check=False)
    assert readonly.returncode == 2 and "could not write latent cache" in readonly.stderr
    assert "Read-only file system" in readonly.stderr and "--cache-dir" in readonly.stderr


@pytest.mark.slow
def test_evaluation_during_training_is_logged_and_plotted(tmp_path):
    proc = run_main(
        "--config", SMOKE, "--set", "train.eval_every=1", "--set", "train.eval_samples=100", "--output-dir", tmp_path
    )
    assert proc.stdout.count("eval (100 samples") == 2
    run = the_run(tmp_path)
    evals = log_records(run, "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and all("accuracy" in e for e in evals)
    train = evals[-1]["references"]["mnist-train"]
    # the floor: the 64 digits the smoke run trained on, against the same reference
    assert train["fd"] > 0 and train["fd_std"] > 0 and train["floor"]["n"] == 64 and train["ratio"] > 0
    assert (run / "figures" / "eval.png").is_file()


@pytest.mark.slow
def test_the_seed_reproduction_config_runs_with_a_tiny_rgb_vae(tmp_path):
    """experiments/sd-vae-mnist.yaml as it is, with a tiny local 3-channel VAE in place of the
    Hub one, a few digits, and DiT-Nano/2 for DiT-B/2 (whose checkpoints weigh 2 GB):
    unconditional, stratified times below 1 - 1e-5, no EMA, dopri5."""
    from tests.conftest import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae3", in_channels=3)
    proc = run_main(
        "--config",
        "sd-vae-mnist",
        "--mixed-precision",
        "no",
        "--set",
        f"vae.pretrained={vae}",
        "--set",
        "data.max_items=64",
        "--set",
        "train.epochs=1",
        "--set",
        "model.name=DiT-Nano/2",
        "--output-dir",
        tmp_path / "runs",
    )
    run = the_run(tmp_path / "runs", "sd-vae-mnist")
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["num_classes"] == 0 and state["model"]["preset"] == "DiT-Nano/2" and state["step"] == 2
    index = json.loads((run / "export" / "model_index.json").read_text())
    assert index["solver"] == "dopri5" and "mixed precision no" in proc.stdout


@pytest.mark.slow
def test_the_best_export_follows_the_validation_loss_and_survives_a_resume(tmp_path):
    args = [
        "--config",
        SMOKE,
        "--set",
        "data.max_items=128",
        "--set",
        "data.val_fraction=0.25",
        "--set",
        "train.epochs=3",
        "--output-dir",
        tmp_path,
    ]
    run_main(*args, env={"LATENTFLOW_FAULTS": "sigkill=12"}, check=False)  # killed in epoch 3
    run = the_run(tmp_path)
    run_main(*args, "--resume", "latest")
    epochs = log_records(run, "epoch")
    losses = [e["val_loss"] for e in epochs]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all(v > 0 for v in losses)
    best = json.loads((run / "best" / "latentflow.json").read_text())
    assert best["epoch"] == 1 + losses.index(min(losses)) and best["val_loss"] == min(losses)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())["train_state"]
    assert state["best_val"] == min(losses) and state["best_epoch"] == best["epoch"]


@pytest.mark.slow
def test_smoke_run_writes_the_run_directory(smoke_run):
    _, run_dir, proc = smoke_run
    for rel in (
        "config.yaml",
        "log.jsonl",
        "figures/epoch_001.png",
        "figures/epoch_002.png",
        "figures/final.png",
        "figures/loss.png",
        "figures/loss_by_time.png",
        "checkpoints/step_00000008/model.safetensors",
        "checkpoints/step_00000008/ema.safetensors",
        "checkpoints/step_00000008/optimizer.pt",
        "checkpoints/step_00000008/rng.pt",
        "checkpoints/step_00000008/state.json",
        "export/model_index.json",
        "export/transformer/config.json",
        "export/vae/config.json",
        "export/experiment.yaml",
    ):
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


@pytest.mark.slow
def test_default_experiment_file_trains_in_a_clean_directory(tmp_path):
    """`--config` is optional: main.py finds experiments/default.yaml from any directory."""
    proc = run_main(
        "--set",
        "data.max_items=32",
        "--set",
        "train.epochs=1",
        "--set",
        "model.name=DiT-Nano/2",
        "--set",
        "sampler.grid_per_class=1",
        "--output-dir",
        tmp_path / "runs",
        cwd=tmp_path,
    )
    run = next((tmp_path / "runs").iterdir())
    assert run.name.startswith("default+") and str(run) in proc.stdout  # name + a short hash of the overrides
    assert "# --set model.name=DiT-Nano/2" in (run / "config.yaml").read_text()  # the overrides, in full
    assert log_records(next((tmp_path / "runs").iterdir()), "start")[0]["overrides"] == [
        "data.max_items=32",
        "train.epochs=1",
        "model.name=DiT-Nano/2",
        "sampler.grid_per_class=1",
    ]


@pytest.mark.slow
def test_tensorboard_events_hold_the_losses_and_the_grid(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = smoke_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "epoch/loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Images("grid")] == [4, 8]  # one grid per epoch


@pytest.mark.slow
def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = run_main("--config", SMOKE, "--set", "train.log_with=wandb", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: train.log_with is 'wandb' but the wandb package is not installed; "
        "`pip install wandb`, or set train.log_with to another tracker or 'none'"
    )
