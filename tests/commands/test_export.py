"""`python main.py export`, as a user runs it."""

import pytest

from tests.conftest import run_main

pytestmark = pytest.mark.slow


def test_export_command_makes_a_pipeline_from_a_checkpoint(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    run_main("export", "--checkpoint", run_dir / "checkpoints" / "step_00000004", "--out", tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    again = run_main("export", "--checkpoint", run_dir, "--out", tmp_path / "pipe", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
