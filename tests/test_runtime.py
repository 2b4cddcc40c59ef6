import errno
import os
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from latentflow.errors import CheckpointError, DiskError
from latentflow.runtime import (
    HOST,
    RankRNG,
    RunLock,
    atomic_dir,
    atomic_file,
    derive_seed,
    get_rng_state,
    remove_stale_temps,
    set_rng_state,
)
from tests.conftest import mount_tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB tmpfs."""
    unmount = mount_tmpfs(tmp_path / "disk", "3m")
    yield tmp_path / "disk"
    unmount()


def test_streams_depend_on_every_key():
    assert derive_seed(0, 1, 0, 5) == derive_seed(0, 1, 0, 5)
    seeds = {derive_seed(0, 1, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_ranks_draw_different_noise_from_reseeded_generators():
    a, b = RankRNG(0, 0, torch.device("cpu")), RankRNG(0, 1, torch.device("cpu"))
    x0 = torch.randn(8, generator=a.at(epoch=2, iteration=3))
    assert not torch.equal(x0, torch.randn(8, generator=b.at(epoch=2, iteration=3)))
    assert not torch.equal(x0, torch.randn(8, generator=a.at(epoch=2, iteration=4)))
    assert torch.equal(x0, torch.randn(8, generator=a.at(epoch=2, iteration=3)))  # where, not when


def test_global_rng_state_round_trips_through_a_safe_load(tmp_path):
    import random

    import numpy as np

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_replacing_a_directory_never_leaves_neither(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
        assert (final / "a.txt").read_text() == "old"  # the old one stays until the new is complete
    assert (final / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
        RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0"),
    ],
    ids=["OSError", "SafetensorError", "torch.save RuntimeError"],
)
def test_a_failed_write_is_one_line_and_keeps_the_old_one(tmp_path, failure):
    final = tmp_path / "checkpoints" / "step_00000010"
    with atomic_dir(final) as tmp:
        (tmp / "w.txt").write_text("good")
    with pytest.raises(DiskError) as info:
        with atomic_dir(final, "checkpoint", needed=5 << 20, intact="earlier checkpoints are intact") as tmp:
            (tmp / "w.txt").write_text("half")
            raise failure
    message = str(info.value)
    assert str(final) in message and "needs about 5.0 MB" in message and "free there" in message
    assert "earlier checkpoints are intact" in message and "\n" not in message
    assert (final / "w.txt").read_text() == "good" and os.listdir(final.parent) == ["step_00000010"]


def test_a_real_full_disk(small_disk):
    big = {"w": torch.zeros(1 << 20)}  # 4 MB on a 3 MB disk
    with pytest.raises(DiskError, match=r"could not write checkpoint .*No space left on device"):
        with atomic_dir(small_disk / "ckpt", "checkpoint") as tmp:
            save_file(big, str(tmp / "model.safetensors"))
    with pytest.raises(DiskError, match="No space left on device"):
        with atomic_file(small_disk / "optimizer.pt", "optimizer") as tmp:
            torch.save(big, tmp)
    assert os.listdir(small_disk) == []  # no temporaries left behind


def test_stale_temporaries_are_removed_and_an_interrupted_swap_is_undone(tmp_path):
    dead_pid = 2**22 + 17  # above pid_max on this kernel: never a live process
    (tmp_path / f".step_00000004.tmp-{HOST}-{dead_pid}").mkdir()  # a writer that died
    (tmp_path / f".cache.tmp-otherhost-{dead_pid}").mkdir()  # another machine's: cannot tell
    (tmp_path / ".epoch_0003.123.tmp").mkdir()  # an earlier release's temporary
    (tmp_path / f".export.old-{HOST}-{dead_pid}").mkdir()  # the old export, renamed away...
    (tmp_path / f".cache.tmp-{HOST}-{os.getppid()}").mkdir()  # a live writer's temporary
    assert remove_stale_temps(tmp_path, any_owner=False) == 1
    assert (tmp_path / "export").is_dir()  # ...is put back: the new one never arrived
    assert len(list(tmp_path.iterdir())) == 4
    assert remove_stale_temps(tmp_path, any_owner=True) == 3  # the run's only writer removes all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_run_has_one_writer(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(CheckpointError, match=f"is being trained by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    # a lock left by a process that died is taken over, and the takeover is reported
    code = f"from latentflow.runtime import RunLock; import os; RunLock({str(tmp_path)!r}).acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code], check=False)
    taken = RunLock(tmp_path).acquire()
    assert taken.previous.startswith("pid ") and str(os.getpid()) not in taken.previous
    taken.release()


def test_unique_temporary_names_per_writer(tmp_path):
    name = uuid.uuid4().hex
    with atomic_file(tmp_path / name) as tmp:
        assert tmp.name.startswith(f".{name}.tmp-") and tmp.name.endswith(f"-{os.getpid()}")
        tmp.write_text("x")
    assert (tmp_path / name).read_text() == "x"
