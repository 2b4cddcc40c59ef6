"""``main.py launch``: its argument handling, in-process; then two processes (gloo on this
CPU) through ``accelerate launch`` and ``main.py launch``: one run shared by both, exact
resume, clean stops, and faults of one process that must end the job in bounded time
instead of hanging it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from latentflow.runs import checkpoints_of, latest_checkpoint
from tests.commands.test_train import assert_log_has_no_duplicates, assert_same_final_state
from tests.conftest import LAUNCH, REPO, SMOKE, alive, children, launch, log_records, popen, the_run, wait_for

# 256 digits over 2 processes x batch 16: 8 optimizer steps per epoch, 24 in all.
EXACT = [
    "--config",
    SMOKE,
    "--set",
    "data.max_items=256",
    "--set",
    "train.epochs=3",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "train.keep_checkpoints=100",
]
LONG = [
    "--config",
    SMOKE,
    "--set",
    "data.max_items=4500",
    "--set",
    "train.epochs=50",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "train.log_every=5",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference2")
    proc = launch(*EXACT, "--output-dir", out, "--cache-dir", out / "cache")
    return out, the_run(out), proc


@pytest.mark.slow
def test_two_processes_share_one_run(reference):
    _, run, proc = reference
    output = proc.stdout + proc.stderr
    assert "2 process(es)" in output and "mixed precision no" in output
    assert output.count("epoch   3/3") == 1  # only the main process prints
    assert [e["step"] for e in log_records(run, "epoch")] == [8, 16, 24]
    assert (run / "export" / "model_index.json").is_file()
    rng = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert rng["step"] == 24


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 6], ids=["mid-epoch", "right-after-a-checkpoint"])
def test_two_process_sigkill_and_resume_is_bit_exact(reference, tmp_path, kill_at):
    out, ref_run, _ = reference
    killed = launch(
        *EXACT,
        "--output-dir",
        tmp_path,
        "--cache-dir",
        out / "cache",
        check=False,
        env={"LATENTFLOW_FAULTS": f"sigkill={kill_at}"},
    )
    assert killed.returncode != 0
    run = the_run(tmp_path)
    proc = launch(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    assert "resuming" in proc.stdout
    assert_same_final_state(ref_run, run, final_step=24)
    assert_log_has_no_duplicates(run)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step(reference, tmp_path):
    """``main.py launch``: the launcher forwards SIGTERM; the ranks agree on the step, write
    one checkpoint, and the launch exits 143. The resumed run ends where the reference did."""
    out, ref_run, _ = reference
    cmd = [
        sys.executable,
        str(REPO / "main.py"),
        "launch",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--",
        *EXACT,
        "--set",
        "train.log_every=1",
        "--output-dir",
        str(tmp_path),
        "--cache-dir",
        str(out / "cache"),
    ]
    err = open(tmp_path / "err.log", "w")
    proc = popen(cmd, env={"LATENTFLOW_FAULTS": "sigkill=1000"}, stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: any(p.is_dir() and log_records(p, "step") for p in tmp_path.iterdir()), what="training")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    run = the_run(tmp_path)
    stopped_at = json.loads((latest_checkpoint(run) / "state.json").read_text())["step"]
    text = (tmp_path / "err.log").read_text()
    assert f"stopped (SIGTERM) after optimizer step {stopped_at}" in text or stopped_at == 24
    # the hint repeats the launch the user typed
    assert "continue with: python main.py launch --num_processes 2 --mixed_precision no -- --config " in text
    launch(*EXACT, "--output-dir", tmp_path, "--cache-dir", out / "cache", "--resume", "latest")
    assert_same_final_state(ref_run, run, final_step=24)


def _start_long(tmp_path, extra=()):
    log = open(tmp_path / "out.log", "w")
    proc = popen([*LAUNCH, *LONG, *extra, "--output-dir", str(tmp_path / "runs")], stdout=log, stderr=subprocess.STDOUT)
    wait_for(
        lambda: (tmp_path / "runs").is_dir() and any(log_records(p, "step") for p in (tmp_path / "runs").iterdir()),
        what="training",
    )
    workers = children(proc.pid)
    assert len(workers) == 2
    return proc, workers


@pytest.mark.slow
def test_a_dead_rank_ends_the_job(tmp_path):
    proc, workers = _start_long(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    assert proc.wait(timeout=120) != 0
    assert time.time() - start < 30 and not any(alive(w) for w in workers)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_bad_input_fails_every_rank_in_one_line(tmp_path):
    """``main.py launch`` prints the workers' error once and exits 2; with ``accelerate
    launch`` the same line comes first, then Accelerate's own report of the failed workers."""
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    args = [
        "--config",
        SMOKE,
        "--set",
        "data.source=npz",
        "--set",
        f"data.path={tmp_path / 'bad.npz'}",
        "--output-dir",
        tmp_path,
    ]
    ours = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "launch", "--num_processes", "2", "--", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ours.returncode == 2, ours.stderr
    line = f"error: {tmp_path / 'bad.npz'}: not an .npz file (not a zip archive); write it with numpy.savez"
    assert len(ours.stderr.strip().splitlines()) == 1 and ours.stderr.startswith(line)
    theirs = launch(*args, check=False)
    assert theirs.returncode != 0
    assert theirs.stderr.splitlines()[0].startswith(line)


# --- argument handling, without launching anything ---------------------------------------------


def launched(monkeypatch, *launcher_args, script=("--config", "smoke")):
    """What `main.py launch LAUNCHER_ARGS -- SCRIPT` would run: ('inline', argv) or ('accelerate', flags)."""
    from latentflow.commands import launch as module

    seen = {}
    monkeypatch.setenv("LATENTFLOW_LAUNCH_COMMAND", "")  # launch() sets it; restored afterwards
    monkeypatch.setattr(module, "_run_launcher", lambda args, script_args: seen.update(accelerate=args) or 0)
    module.launch(list(launcher_args), list(script), run_inline=lambda argv: seen.update(inline=argv) or 0)
    return seen


def test_the_two_halves_of_a_launch_command_line():
    from latentflow.commands.launch import split_argv

    assert split_argv(["--num_processes", "2", "--", "sample", "--seed", "1"]) == (
        ["--num_processes", "2"],
        ["sample", "--seed", "1"],
    )
    assert split_argv(["--num_processes=2"]) == (["--num_processes=2"], [])


def test_one_process_runs_in_this_process_with_its_precision(monkeypatch):
    seen = launched(monkeypatch, "--num_processes", "1", "--mixed_precision=bf16")
    assert seen == {"inline": ["--config", "smoke", "--mixed-precision", "bf16"]}
    seen = launched(monkeypatch, "--num_processes=1", "--mixed_precision", "no", script=("sample", "--seed", "1"))
    assert seen == {"inline": ["sample", "--seed", "1"]}  # only training takes a precision flag


def test_several_processes_take_accelerates_multi_process_launcher(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    flags = launched(monkeypatch, "--num_processes", "2")["accelerate"]
    assert "--multi_gpu" in flags and flags[flags.index("--num_machines") + 1] == "1"
    assert "--mixed_precision" in flags and "--dynamo_backend" in flags  # latentflow's defaults, no warnings
    # the usable cores shared between the processes, unless the user chose
    cores = len(os.sched_getaffinity(0))
    assert flags[flags.index("--num_cpu_threads_per_process") + 1] == str(max(1, cores // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "--num_cpu_threads_per_process" not in launched(monkeypatch, "--num_processes", "2")["accelerate"]
    own = launched(monkeypatch, "--config_file", "experiments/accelerate/fsdp.yaml")["accelerate"]
    assert own == ["--config_file", "experiments/accelerate/fsdp.yaml"]  # a config file says it all


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_process_count_is_one_line(monkeypatch, bad):
    from latentflow.errors import LatentflowError

    with pytest.raises(LatentflowError, match=f"launch --num_processes '{bad}': give a whole number >= 1"):
        launched(monkeypatch, "--num_processes", bad)


def test_launch_has_help_and_is_listed(capsys):
    from latentflow.cli import main

    assert main(["launch", "--help"]) == 0
    assert "accelerate launch flags" in capsys.readouterr().out
