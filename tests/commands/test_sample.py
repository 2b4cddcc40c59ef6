"""`python main.py sample`, as a user runs it."""

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_main

pytestmark = pytest.mark.slow


def test_sample_writes_npz_and_grid_from_an_export_a_run_or_a_checkpoint(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run_main(
        "sample",
        "--checkpoint",
        run_dir / "export",
        "--num-samples",
        "6",
        "--labels",
        "3,7",
        "--solver",
        "euler",
        "--steps",
        "3",
        "--seed",
        "1",
        "--out",
        tmp_path / "s.npz",
    )
    assert "NFE 3" in proc.stdout
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["images"].shape == (6, 32, 32, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "s.png").is_file()
    # the newest checkpoint holds the same EMA weights as the export: the same images
    run_main(
        "sample",
        "--checkpoint",
        run_dir / "checkpoints" / "step_00000008",
        "--num-samples",
        "6",
        "--labels",
        "3,7",
        "--solver",
        "euler",
        "--steps",
        "3",
        "--seed",
        "1",
        "--out",
        tmp_path / "c.npz",
    )
    assert np.array_equal(np.load(tmp_path / "c.npz")["images"], arrays["images"])
    again = run_main("sample", "--checkpoint", run_dir, "--num-samples", "6", "--out", tmp_path / "s.png", check=False)
    assert again.returncode == 2 and "already exist" in again.stderr  # never overwrites silently


def test_sample_writes_under_the_run_by_default(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run_main("sample", "--checkpoint", run_dir, "--num-samples", "4", "--trajectory", "4", cwd=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing in the current directory
    written = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert written == [
        "euler-2-cfg2-int0.2-1-n4-seed0.npz",
        "euler-2-cfg2-int0.2-1-n4-seed0.png",
        "euler-2-cfg2-int0.2-1-n4-seed0_trajectory.png",
    ], proc.stdout


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (15 - 1)))


def test_sigterm_stops_sampling_in_one_line_and_leaves_nothing_partial(smoke_run, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, _env

    _, run_dir, _ = smoke_run
    out = tmp_path / "many.npz"
    args = ["sample", "--checkpoint", run_dir, "--num-samples", "100000", "--steps", "200", "--out", out]
    command = [sys.executable, str(REPO / "main.py"), *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:  # past start-up, into the command
        time.sleep(0.2)
    time.sleep(3)  # loading the model, then sampling: minutes of work at this size
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "stopped (SIGTERM): completed checkpoints and outputs are intact"
    assert not list(tmp_path.iterdir())  # no sample file, no temporary one
