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
