import errno

import pytest
import torch

from latentflow import checkpoint as ck
from latentflow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
    resolve_resume,
    save_checkpoint,
)


def states(value=1.0):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def save(run, epoch, keep=2, value=1.0):
    model, opt = states(value)
    return save_checkpoint(run, epoch, model, model, opt, {"epoch": epoch, "step": 10 * epoch}, keep=keep)


def test_run_directories_never_collide(tmp_path):
    runs = {new_run_dir(tmp_path, "exp") for _ in range(3)}
    assert len(runs) == 3 and all(r.is_dir() and r.name.startswith("exp-") for r in runs)


def test_checkpoints_round_trip_with_safe_loading(tmp_path):
    path = save(tmp_path, 1, value=0.5)
    loaded = load_checkpoint(path)  # optimizer state via torch.load(weights_only=True)
    assert torch.all(loaded["model"]["weight"] != 0)
    assert loaded["state"] == {"epoch": 1, "step": 10}
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)


def test_latest_only_trusts_complete_checkpoints_and_old_ones_are_pruned(tmp_path):
    for epoch in (1, 2, 3):
        save(tmp_path, epoch)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_0002", "epoch_0003"]
    (tmp_path / "checkpoints" / ".epoch_0004.123.tmp").mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "epoch_0005").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "epoch_0003"


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are intact"):
        save(tmp_path, 2)
    assert latest_checkpoint(tmp_path).name == "epoch_0001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001"]
    load_checkpoint(latest_checkpoint(tmp_path))


def test_resolve_resume(tmp_path):
    assert resolve_resume("latest", tmp_path, "exp") is None  # nothing saved: start fresh
    run = new_run_dir(tmp_path, "exp")
    save(run, 1)
    save(run, 2)
    assert resolve_resume("latest", tmp_path, "exp") == (run, run / "checkpoints" / "epoch_0002")
    assert resolve_resume(str(run), tmp_path, "exp")[1].name == "epoch_0002"
    assert resolve_resume(str(run / "checkpoints" / "epoch_0001"), tmp_path, "exp") == (
        run, run / "checkpoints" / "epoch_0001")
    assert resolve_resume("latest", tmp_path, "other") is None
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(str(tmp_path / "missing"), tmp_path, "exp")
    empty = new_run_dir(tmp_path, "empty")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(empty), tmp_path, "exp")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="epoch_0001 is unreadable"):
        load_checkpoint(path)
