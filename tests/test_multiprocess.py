"""Two processes (gloo on this CPU) through ``accelerate launch`` and ``main.py launch``: one
run shared by both, exact resume, clean stops, and faults of one process that must end the
job in bounded time instead of hanging it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from latentflow.checkpoint import checkpoints_of, latest_checkpoint
from tests.conftest import LAUNCH, REPO, SMOKE, alive, children, launch, log_records, popen, the_run, wait_for
from tests.test_train import assert_log_has_no_duplicates, assert_same_final_state

pytestmark = pytest.mark.slow

# 256 digits over 2 processes x batch 16: 8 optimizer steps per epoch, 24 in all.
EXACT = ["--config", SMOKE, "--set", "data.max_items=256", "--set", "train.epochs=3",
         "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=100"]
LONG = ["--config", SMOKE, "--set", "data.max_items=4500", "--set", "train.epochs=50",
        "--set", "train.checkpoint_every=20", "--set", "train.log_every=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference2")
    proc = launch(*EXACT, "--output-dir", out, "--cache-dir", out / "cache")
    return out, the_run(out), proc


def test_two_processes_share_one_run(reference):
    _, run, proc = reference
    output = proc.stdout + proc.stderr
    assert "2 process(es)" in output and "mixed precision no" in output
    assert output.count("epoch   3/3") == 1  # only the main process prints
    assert [e["step"] for e in log_records(run, "epoch")] == [8, 16, 24]
    assert (run / "export" / "model_index.json").is_file()
    rng = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert rng["step"] == 24


@pytest.mark.parametrize("kill_at", [5, 6], ids=["mid-epoch", "right-after-a-checkpoint"])
def test_two_process_sigkill_and_resume_is_bit_exact(reference, tmp_path, kill_at):
    out, ref_run, _ = reference
    killed = launch(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", check=False,
                    env={"LATENTFLOW_FAULTS": f"sigkill={kill_at}"})
    assert killed.returncode != 0
    run = the_run(tmp_path)
    proc = launch(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    assert "resuming" in proc.stdout
    assert_same_final_state(ref_run, run, final_step=24)
    assert_log_has_no_duplicates(run)


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step(reference, tmp_path):
    """``main.py launch``: the launcher forwards SIGTERM; the ranks agree on the step, write
    one checkpoint, and the launch exits 143. The resumed run ends where the reference did."""
    out, ref_run, _ = reference
    cmd = [sys.executable, str(REPO / "main.py"), "launch", "--num_processes", "2", "--mixed_precision", "no", "--",
           *EXACT, "--set", "train.log_every=1", "--output-dir", str(tmp_path), "--cache-dir", str(out / "cache")]
    err = open(tmp_path / "err.log", "w")
    proc = popen(cmd, env={"LATENTFLOW_FAULTS": "sigkill=1000"}, stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: any(p.is_dir() and log_records(p, "step") for p in tmp_path.iterdir()), what="training")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    run = the_run(tmp_path)
    stopped_at = json.loads((latest_checkpoint(run) / "state.json").read_text())["step"]
    text = (tmp_path / "err.log").read_text()
    assert f"stopped (SIGTERM) after optimizer step {stopped_at}" in text or stopped_at == 24
    launch(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    assert_same_final_state(ref_run, run, final_step=24)


def _start_long(tmp_path, extra=()):
    log = open(tmp_path / "out.log", "w")
    proc = popen([*LAUNCH, *LONG, *extra, "--output-dir", str(tmp_path / "runs")], stdout=log,
                 stderr=subprocess.STDOUT)
    wait_for(lambda: (tmp_path / "runs").is_dir() and any(
        log_records(p, "step") for p in (tmp_path / "runs").iterdir()), what="training")
    workers = children(proc.pid)
    assert len(workers) == 2
    return proc, workers


def test_a_dead_rank_ends_the_job(tmp_path):
    proc, workers = _start_long(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    assert proc.wait(timeout=120) != 0
    assert time.time() - start < 30 and not any(alive(w) for w in workers)


def test_a_stalled_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    proc, workers = _start_long(tmp_path, ["--dist-timeout", "8"])
    os.kill(workers[1], signal.SIGSTOP)
    start = time.time()
    try:
        wait_for(lambda: not alive(workers[0]), timeout=90, what="the live rank to give up")
        took = time.time() - start
    finally:
        # torchrun would SIGKILL the stopped one 30 s after its SIGTERM, which it cannot act on
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=60)
    text = (tmp_path / "out.log").read_text()
    assert "error: process 0 lost contact with the others" in text and "--dist-timeout 8 s" in text
    assert 8 <= took < 30, took
    assert proc.returncode != 0


def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    proc, workers = _start_long(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # what a scheduler does: the launcher's process group
    proc.wait()
    start = time.time()
    wait_for(lambda: not any(alive(w) for w in workers), timeout=60, what="the workers to stop")
    assert time.time() - start < 30
    run = the_run(tmp_path / "runs")
    assert checkpoints_of(run)  # they stopped cleanly, with a checkpoint
    assert "stopped (the launcher process is gone)" in (tmp_path / "out.log").read_text()


def test_a_bad_input_fails_every_rank_in_one_line(tmp_path):
    """``main.py launch`` prints the workers' error once and exits 2; with ``accelerate
    launch`` the same line comes first, then Accelerate's own report of the failed workers."""
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    args = ["--config", SMOKE, "--set", "data.source=npz", "--set", f"data.path={tmp_path / 'bad.npz'}",
            "--output-dir", tmp_path]
    ours = subprocess.run([sys.executable, str(REPO / "main.py"), "launch", "--num_processes", "2", "--", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert ours.returncode == 2, ours.stderr
    line = f"error: {tmp_path / 'bad.npz'}: not an .npz file (not a zip archive); write it with numpy.savez"
    assert len(ours.stderr.strip().splitlines()) == 1 and ours.stderr.startswith(line)
    theirs = launch(*args, check=False)
    assert theirs.returncode != 0
    assert theirs.stderr.splitlines()[0].startswith(line)
