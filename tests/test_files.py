"""Atomic writes, disk errors, temporaries left by crashes."""

import errno
import os
import uuid

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from latentflow.errors import DiskError
from latentflow.files import HOST, atomic_dir, atomic_file, remove_stale_temps
from tests.conftest import mount_tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB tmpfs."""
    unmount = mount_tmpfs(tmp_path / "disk", "3m")
    yield tmp_path / "disk"
    unmount()


def test_replacing_a_directory_never_leaves_neither(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
        assert (final / "a.txt").read_text() == "old"  # the old one stays until the new is complete
    assert (final / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_replacing_a_symlinked_directory_leaves_its_target_and_no_temporary(tmp_path):
    target, final = tmp_path / "elsewhere", tmp_path / "export"
    target.mkdir()
    (target / "a.txt").write_text("old")
    final.symlink_to(target, target_is_directory=True)
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert not final.is_symlink() and (final / "a.txt").read_text() == "new"
    assert (target / "a.txt").read_text() == "old"  # the link's target is the user's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "export"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
        RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0"),
        SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),  # ulimit -f
    ],
    ids=["OSError", "SafetensorError", "torch.save RuntimeError", "file size limit"],
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


def test_unique_temporary_names_per_writer(tmp_path):
    name = uuid.uuid4().hex
    with atomic_file(tmp_path / name) as tmp:
        assert tmp.name.startswith(f".{name}.tmp-") and tmp.name.endswith(f"-{os.getpid()}")
        tmp.write_text("x")
    assert (tmp_path / name).read_text() == "x"


def test_outputs_are_checked_before_any_work(tmp_path):
    from latentflow.errors import LatentflowError
    from latentflow.files import ASSETS, check_output

    check_output(tmp_path / "new.png")  # nothing there: fine
    (tmp_path / "a.png").write_text("x")
    (tmp_path / "a.npz").write_text("x")
    with pytest.raises(
        LatentflowError, match=r"a.png, .*a.npz already exist; choose another --out or pass --overwrite"
    ):
        check_output([tmp_path / "a.png", tmp_path / "a.npz"])
    check_output([tmp_path / "a.png", tmp_path / "a.npz"], overwrite=True)
    with pytest.raises(LatentflowError, match=r"--out .*/a.png/x.png: .*a.png is a file, not a directory"):
        check_output(tmp_path / "a.png" / "x.png")
    with pytest.raises(LatentflowError, match=r"--output-dir .*a.png: .*a.png is a file; give a directory"):
        check_output(tmp_path / "a.png", overwrite=True, flag="--output-dir", directory=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", directory=True)  # an empty directory holds nothing to lose
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(LatentflowError, match="already exists"):
        check_output(tmp_path / "full", directory=True)
    with pytest.raises(LatentflowError, match="is not what this command writes .no model_index.json"):
        check_output(tmp_path / "full", overwrite=True, directory=True, only_replaces="model_index.json")
    with pytest.raises(LatentflowError, match="one of the assets latentflow ships"):
        check_output(ASSETS / "mnist-vae", overwrite=True, directory=True)
