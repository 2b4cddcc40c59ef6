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
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-int0.2-1-n40-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["num_samples"] == 40
    assert report["settings"]["cfg_scale"] == 2 and 0 <= report["accuracy"] <= 1
    test = report["references"]["mnist-test"]
    assert test["fd"] > 0 and test["ratio"] > 1  # a 2-epoch model is worse than its training digits
    assert set(report["references"]) == {"mnist-test", "mnist-train"}
    assert report["feature_net_test_accuracy"] >= 0.99 and report["feature_net"].startswith("digits@")
    pr = report["precision_recall"]
    assert 0 <= pr["precision"] <= 1 and 0 <= pr["recall"] <= 1 and pr["n"] == 40 and pr["against"] == "mnist-test"
    # the same samples scored by another feature net: a report of its own, the first one kept
    other = ("evaluate", "--checkpoint", run_dir / "export", "--num-samples", "40", "--solver", "heun")
    run_main(*other, "--steps", "2", "--cfg-scale", "2", "--feature-net", "digits-pooled")
    pooled = json.loads((run_dir / "eval" / "heun-2-cfg2-int0.2-1-n40-seed0-digits-pooled.json").read_text())
    assert pooled["feature_net"] != report["feature_net"]
    assert json.loads((run_dir / "eval" / "heun-2-cfg2-int0.2-1-n40-seed0.json").read_text()) == report
    again = run_main(*other, "--steps", "2", "--cfg-scale", "2", check=False)  # an earlier report is kept
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert (
        "heun-2-cfg2-int0.2-1-n40-seed0.json already exists; choose another --out or pass --overwrite" in again.stderr
    )


def test_a_default_report_is_named_by_everything_that_changes_its_scores():
    from latentflow.commands.evaluate import _report_name

    plain = _report_name("meanflow-1-cfg1.5", 100, 0, False, "auto", None, ())
    assert plain == "meanflow-1-cfg1.5-n100-seed0.json"
    other = _report_name("meanflow-1-cfg1.5", 100, 0, True, "/nets/my-clf", "/refs/test.npz", ["data.max_items=12"])
    assert other.startswith("meanflow-1-cfg1.5-n100-seed0-uncond-my-clf-ref-test+") and other.endswith(".json")
    assert other != _report_name(
        "meanflow-1-cfg1.5", 100, 0, True, "/nets/my-clf", "/refs/test.npz", ["data.max_items=13"]
    )


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
        "--solver-error",
        "20",
    )
    assert "mnist-test: FD" in proc.stdout and "floor" in proc.stdout and "recall" in proc.stdout
    report = json.loads((run_dir / "eval" / "heun-2-cfg2-int0.1-0.9-n1000-seed0.json").read_text())
    assert report["settings"]["nfe"] == 4 and report["settings"]["guidance_interval"] == [0.1, 0.9]
    test, train = report["references"]["mnist-test"], report["references"]["mnist-train"]
    assert test["reference_images"] == 10_000 and train["reference_images"] == 60_000
    # the floor: the 64 digits the smoke model trains on, against the same reference at the same size
    assert test["floor"]["n"] == test["matched"]["n"] == 64 and test["matched"]["subsets"] == 15
    assert test["ratio"] > 1 and test["fd_std"] > 0 and test["floor"]["std"] > 0
    error = report["solver_error"]
    assert error["n"] == 20 and error["rms"] > 0 and error["reference_nfe"] > 4
    stats = tmp_path / "ref.npz"
    run_main("fd-stats", "--data", "split=test", "--out", stats)
    against = run_main(
        "evaluate", "--checkpoint", run_dir, "--num-samples", "200", "--reference", stats, "--out", tmp_path / "r.json"
    )
    assert "ref: FD" in against.stdout
    assert json.loads((tmp_path / "r.json").read_text())["references"]["ref"]["reference_images"] == 500
