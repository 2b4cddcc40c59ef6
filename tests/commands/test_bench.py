"""The benchmark: it runs on tiny models and its numbers are consistent (not a timing test)."""


def test_benchmark_runs_and_reports_sane_numbers(tmp_path):
    """Not a timing test: the benchmark runs on tiny models and its numbers are consistent."""
    import json

    from latentflow.cli import main

    assert (
        main(
            [
                "bench",
                "--tiny",
                "--cpu",
                "--batches",
                "8,16",
                "--baseline-batch",
                "8",
                "--window-seconds",
                "0.2",
                "--windows",
                "2",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows)[0].startswith("(a) baseline") and len(rows) >= 5
    for r in rows.values():
        assert r["images_per_s"] > 0 and 0 < r["fraction_of_peak"] < 5 and r["peak_memory_mb"] > 0
        assert (
            abs(r["dit_gflops_per_s"] - r["images_per_s"] * report["train_gflop_per_image"])
            < 1e-6 * r["dit_gflops_per_s"] + 1e-9
        )
    assert report["matmul_peak_gflops"]["fp32"] > 0 and report["best"]["speedup_vs_baseline"] > 0
    assert rows["(f) meanflow objective"]["step_cost_vs_cfm"] > 1  # a derivative pass and a guidance pass more
    assert rows["(f) meanflow objective, difference derivative"]["step_cost_vs_cfm"] > 1  # plain passes instead
