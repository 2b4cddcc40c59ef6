"""`python main.py evaluate` and `fd-stats`, as a user runs them."""

import json

import pytest

from tests.conftest import run_main

pytestmark = pytest.mark.slow


def test_evaluate_reports_fd_accuracy_and_settings(smoke_run):
    _, run_dir, _ = smoke_run
    proc = run_main(
        "evaluate",
        "--checkpoint",
        run_dir / "export",
        "--num-samples",
        "40",
        "--solver",
        "heun",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
    )
    assert "FD " in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-n40-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["num_samples"] == 40
    assert report["settings"]["cfg_scale"] == 2 and 0 <= report["accuracy"] <= 1
    train = report["references"]["train"]
    assert train["fd"] > 0 and train["ratio"] > 1  # a 2-epoch model is worse than held-out real digits
    assert set(report["references"]) == {"train", "held-out"}
    assert report["feature_net_test_accuracy"] >= 0.97


@pytest.mark.slow
def test_evaluate_reports_both_references_with_floors_and_spreads(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    proc = run_main(
        "evaluate",
        "--checkpoint",
        run_dir / "export",
        "--num-samples",
        "1000",
        "--solver",
        "heun",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
        "--guidance-interval",
        "0.1,0.9",
    )
    assert "train: FD" in proc.stdout and "floor" in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-int0.1-0.9-n1000-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["guidance_interval"] == [0.1, 0.9]
    train, held = report["references"]["train"], report["references"]["held-out"]
    assert train["reference_images"] == 64 and held["reference_images"] == 500  # smoke trains on 64 digits
    assert train["matched"]["subsets"] == 2 and train["floor"]["n"] == 500 and train["floor"]["subsets"] == 1
    assert train["ratio"] > 1  # a 2-epoch model is worse than real held-out digits
    assert train["fd_std"] > 0 and train["floor"]["std"] > 0
    stats = tmp_path / "ref.npz"
    run_main("fd-stats", "--data", "split=test", "--out", stats)
    against = run_main(
        "evaluate", "--checkpoint", run_dir, "--num-samples", "200", "--reference", stats, "--out", tmp_path / "r.json"
    )
    assert "ref: FD" in against.stdout
    assert json.loads((tmp_path / "r.json").read_text())["references"]["ref"]["reference_images"] == 500
