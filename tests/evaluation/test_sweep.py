"""The sampler sweep (experiments/fd_vs_nfe.py) on the session's smoke run: a small grid makes
its figure, table and JSON, one row per point, with the latent error where it was asked for."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, _env


@pytest.mark.slow
def test_a_small_sweep_writes_its_figure_table_and_points(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    out = tmp_path / "sweep" / "fd_vs_nfe.png"
    cmd = [sys.executable, str(REPO / "experiments" / "fd_vs_nfe.py"), "--checkpoint", str(run_dir)]
    cmd += ["--num-samples", "20", "--error-samples", "10", "--grid", "euler=1,4", "--scales", "1,2"]
    cmd += ["--guidance-interval", "0.3-1", "--intervals", "0.2-1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [(p["sweep"], p["solver"], p["nfe"], p["cfg_scale"], p["interval"]) for p in points] == [
        ("solver", "euler", 1, 2.0, [0.3, 1.0]),  # --guidance-interval: the solver sweep's
        ("solver", "euler", 4, 2.0, [0.3, 1.0]),
        ("guidance", "euler", 2, 1.0, None),  # no guidance: no interval to vary
        ("guidance", "euler", 2, 2.0, None),
        ("guidance", "euler", 2, 2.0, [0.2, 1.0]),
    ]  # the smoke export samples with euler 2 at guidance 2 (from t = 0.2, the default's)
    assert points[3]["fd"] != points[4]["fd"]  # the interval reached the sampler
    solver_rows, guidance_rows = points[:2], points[2:]
    assert solver_rows[0]["latent_rms_error"] > solver_rows[1]["latent_rms_error"] > 0
    assert all(p["latent_rms_error"] is None for p in guidance_rows)  # not asked for (--guidance-error)
    assert out.is_file() and not out.with_suffix(".partial.json").exists()
    assert out.with_suffix(".md").read_text().count("\n") == 2 + len(points)
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr  # an earlier sweep is never replaced
    bad = subprocess.run(cmd[:4] + ["--grid", "euler=x"], capture_output=True, text=True, env=_env(), timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --grid item 'euler=x'")
    bad = subprocess.run(
        cmd[:4] + ["--guidance-interval", "0.2-1,0.3-1"], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert (
        bad.returncode == 1
        and bad.stderr.strip() == "error: --guidance-interval '0.2-1,0.3-1' is more than one interval"
    )
    bad = subprocess.run(cmd[:4] + ["--intervals", "0.9-0.2"], capture_output=True, text=True, env=_env(), timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --intervals item '0.9-0.2' needs 0 <= LO < HI <= 1"
