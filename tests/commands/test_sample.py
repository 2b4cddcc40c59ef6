"""`python main.py sample`, as a user runs it."""

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
        "euler-2-cfg1.5-n4-seed0.npz",
        "euler-2-cfg1.5-n4-seed0.png",
        "euler-2-cfg1.5-n4-seed0_trajectory.png",
    ], proc.stdout
