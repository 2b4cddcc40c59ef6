"""The checkpoint manager's parts: writing and rotation, safe loading, which checkpoint a
resume takes, full state dicts of compiled and sharded models."""

import io
import json
import pickle

import pytest
import torch

from latentflow.errors import CheckpointError
from latentflow.runs import checkpoints_of, latest_checkpoint, load_checkpoint, new_run_dir, read_state
from latentflow.training.checkpoints import resolve_resume, save_checkpoint


def states(value=1.0):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def save(run, step, keep=2, value=1.0):
    model, opt = states(value)
    (run / "config.yaml").write_text("name: exp\n")
    meta = {
        "step": step,
        "epoch": step // 10,
        "train_state": {},
        "model": {"class": "Linear", "config": {}},
        "num_classes": 10,
        "latent_shape": [4, 8, 8],
        "vae": {"identity": "v@0"},
    }
    return save_checkpoint(
        run,
        step,
        model=model,
        ema=model,
        optimizer={"optimizer": opt, "scaler": None},
        rng={"world_size": 1, "ranks": [{"torch": torch.get_rng_state()}]},
        state=meta,
        keep=keep,
    )


def test_checkpoints_round_trip_with_safe_loading(tmp_path):
    path = save(tmp_path, 10, value=0.5)
    assert path.name == "step_00000010"
    loaded = load_checkpoint(path)  # optimizer and RNG via torch.load(weights_only=True)
    assert torch.all(loaded["model"]["weight"] == loaded["ema"]["weight"])
    assert loaded["state"]["step"] == 10 and loaded["state"]["format"] == 2
    assert loaded["optimizer"]["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert loaded["rng"]["world_size"] == 1


def test_rotation_orders_by_step_and_only_complete_checkpoints_count(tmp_path):
    for step in (5, 40, 300):  # 300 sorts before 40 as text: rotation must use the number
        save(tmp_path, step)
    assert [s for s, _ in checkpoints_of(tmp_path)] == [40, 300]
    (tmp_path / "checkpoints" / ".step_00000400.tmp-vm-123").mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "step_00000500").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step_00000300"


def test_rotating_out_a_symlinked_checkpoint_removes_the_link_and_leaves_its_target(tmp_path):
    """A user who moved an old checkpoint to another disk and linked it back: rotation drops
    the link, keeps what it points to, and leaves no temporary behind."""
    run, elsewhere = tmp_path / "run", tmp_path / "other-disk"
    run.mkdir()
    moved = save(run, 10).rename(elsewhere)
    (run / "checkpoints" / "step_00000010").symlink_to(moved, target_is_directory=True)
    save(run, 20)
    save(run, 30)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    assert (elsewhere / "state.json").is_file()


def without_hashes(path):
    """The checkpoint as earlier releases wrote it: no recorded hashes."""
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))


def test_a_damaged_checkpoint_is_named_with_its_part(tmp_path):
    path = save(tmp_path, 10)
    model = path / "model.safetensors"
    damaged = bytearray(model.read_bytes())
    damaged[-4:] = b"\x00\x00\x80\x3f"  # finite garbage of the same size: only the hash tells
    model.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the hash its state.json records"):
        load_checkpoint(path)
    without_hashes(path)
    load_checkpoint(path)  # an earlier release's checkpoint: taken as it is
    path = save(tmp_path, 15)
    without_hashes(path)
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be loaded .*use an earlier checkpoint"):
        load_checkpoint(path)
    path = save(tmp_path, 20)
    without_hashes(path)
    (path / "optimizer.pt").write_bytes(pickle.dumps(object()))  # pickled objects: refused safely
    with pytest.raises(CheckpointError, match="pickled Python objects, which are not loaded for safety"):
        load_checkpoint(path)
    path = save(tmp_path, 30)
    state = json.loads((path / "state.json").read_text())
    del state["epoch"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json lacks epoch"):
        read_state(path)


def test_resume_passes_over_damaged_and_incomplete_checkpoints(tmp_path):
    run = new_run_dir(tmp_path, "exp")
    save(run, 10, keep=10)
    save(run, 20, keep=10)
    third = save(run, 30, keep=10)
    (third / "ema.safetensors").write_bytes((third / "ema.safetensors").read_bytes()[::-1])  # same size, garbage
    (run / "checkpoints" / "step_00000040").mkdir()  # its state.json never written
    resume = resolve_resume("latest", tmp_path, "exp")
    assert resume.checkpoint.name == "step_00000020"
    assert [(p.name, why.split(" (")[0]) for p, why in resume.skipped] == [
        ("step_00000040", "is incomplete"),
        ("step_00000030", "ema.safetensors does not match the hash its state.json records"),
    ]
    with pytest.raises(CheckpointError, match="ema.safetensors does not match"):
        resolve_resume(str(third), tmp_path, "exp")  # asked for by name: refused, not replaced


def test_resolve_resume(tmp_path):
    assert resolve_resume("latest", tmp_path, "exp") is None  # nothing saved: start fresh
    run = new_run_dir(tmp_path, "exp")
    save(run, 10)
    save(run, 20)
    assert resolve_resume("latest", tmp_path, "exp")[:2] == (run, run / "checkpoints" / "step_00000020")
    assert resolve_resume(str(run), tmp_path, "exp")[1].name == "step_00000020"
    assert resolve_resume(str(run / "checkpoints" / "step_00000010"), tmp_path, "exp")[:2] == (
        run,
        run / "checkpoints" / "step_00000010",
    )
    assert resolve_resume("latest", tmp_path, "other") is None
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(str(tmp_path / "missing"), tmp_path, "exp")
    empty = new_run_dir(tmp_path, "empty")
    with pytest.raises(CheckpointError, match="not a run directory"):
        resolve_resume(str(empty), tmp_path, "exp")
    (empty / "config.yaml").write_text("name: empty\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(empty), tmp_path, "exp")


@pytest.mark.parametrize("how", ["in place", "wrapper"])
def test_a_compiled_models_state_loads_into_a_plain_model(how):
    """`train.compile` compiles the module in place; saved state never carries
    `_orig_mod.`, and a `torch.compile` wrapper's own state dict loads too."""
    from latentflow.models import create_model
    from latentflow.training.checkpoints import load_model_state, model_state

    torch.manual_seed(0)
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    if how == "in place":
        model.compile(backend="eager")
        trained = model
    else:
        trained = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    for _ in range(2):  # move every weight off its initial value
        trained(x, t, y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = model_state(trained)
    assert not any("_orig_mod." in k for k in state)  # what checkpoints and exports hold
    for saved in (state, trained.state_dict()):  # the wrapper's own state_dict has the prefix
        plain = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
        load_model_state(plain, saved)
        with torch.no_grad():
            assert torch.equal(plain(x, t, y), model(x, t, y))


@pytest.mark.parametrize("written_fused", [True, False], ids=["fused", "unfused (earlier releases)"])
def test_a_resumed_optimizer_keeps_the_implementation_its_checkpoint_was_written_with(written_fused):
    """Training uses fused AdamW; checkpoints of earlier releases were written by the unfused
    one. The two round differently, so a resume continues with the checkpoint's own."""
    from latentflow.training.checkpoints import load_optimizer_state, optimizer_state
    from latentflow.training.optim import adamw

    def trained(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = adamw(model.parameters(), lr=1e-2, fused=fused)
        for _ in range(3):
            model(torch.ones(2, 8)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    writer_model, writer_opt = trained(written_fused)
    buffer = io.BytesIO()  # through bytes, as a checkpoint's optimizer.pt
    torch.save(optimizer_state(writer_model, writer_opt), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, opt = trained(True)  # what training builds now
    load_optimizer_state(model, opt, saved)
    assert bool(opt.param_groups[0]["fused"]) == written_fused
    model.load_state_dict(writer_model.state_dict())
    for m, o in ((writer_model, writer_opt), (model, opt)):  # one more step on each: identical
        m(torch.ones(2, 8)).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.weight, writer_model.weight)
