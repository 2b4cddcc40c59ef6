"""Stops and locks."""

import os
import subprocess
import sys

import pytest

from latentflow.errors import CheckpointError
from latentflow.signals import RunLock


def test_a_run_has_one_writer(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(CheckpointError, match=f"is being trained by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    # a lock left by a process that died is taken over, and the takeover is reported
    code = f"from latentflow.signals import RunLock; import os; RunLock({str(tmp_path)!r}).acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code], check=False)
    taken = RunLock(tmp_path).acquire()
    assert taken.previous.startswith("pid ") and str(os.getpid()) not in taken.previous
    taken.release()


def test_a_lock_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(CheckpointError, match=r"\.lock is a link to .*victim.txt, not this run's lock file"):
        RunLock(run).acquire()
    assert victim.read_text() == "someone else's file\n"
