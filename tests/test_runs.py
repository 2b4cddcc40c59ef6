"""Run directories: names, creation, and what a path on the command line points to."""

import pytest

from latentflow.errors import CheckpointError
from latentflow.runs import new_run_dir, resolve_source, run_base_name, runs_of
from latentflow.training.checkpoints import resolve_resume
from tests.training.test_checkpoints import save


def test_run_directories_never_collide_and_latest_matches_the_exact_experiment(tmp_path):
    runs = {new_run_dir(tmp_path, "exp") for _ in range(3)}
    assert len(runs) == 3 and all(r.is_dir() and r.name.startswith("exp-") for r in runs)
    new_run_dir(tmp_path, "exp-big")  # another experiment whose name starts the same
    new_run_dir(tmp_path, "exp+model.name=DiT-S_2")
    assert sorted(runs_of(tmp_path, "exp")) == sorted(runs)


def test_overrides_that_change_the_experiment_name_the_run_with_a_short_hash():
    name = run_base_name("default", ["model.name=DiT-S/2", "train.lr=2e-3"])
    assert name.startswith("default+") and len(name) == len("default+") + 8
    assert run_base_name("default", ["train.lr=2e-3", " model.name=DiT-S/2"]) == name  # order and spaces do not matter
    assert run_base_name("default", ["model.name=DiT-S/2", "train.lr=3e-3"]) != name
    # fields a continued run may change do not rename it, so --resume latest still finds it
    assert run_base_name("default", ["train.epochs=80", "train.checkpoint_every=100"]) == "default"
    assert run_base_name("default", ["autoencoder.epochs=3"]) == "default"  # train-vae's section


def test_sources_an_export_a_run_and_a_checkpoint(tmp_path):
    run = new_run_dir(tmp_path, "exp")
    ckpt = save(run, 10)
    assert resolve_source(run).kind == "checkpoint" and resolve_source(run).path == ckpt
    assert resolve_source(ckpt).run_dir == run
    (run / "export").mkdir()
    (run / "export" / "model_index.json").write_text("{}")
    assert resolve_source(run).kind == "export"
    with pytest.raises(CheckpointError, match="is an export"):
        resolve_resume(str(run / "export"), tmp_path, "exp")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_source(run / "config.yaml")
    with pytest.raises(CheckpointError, match="neither an export, a run directory nor a checkpoint"):
        resolve_source(tmp_path)
