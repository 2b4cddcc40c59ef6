"""The installable package: pyproject's dependencies match requirements.txt (CI installs
that file), and a built wheel carries the code, the `latentflow` command and the assets."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _requirements():
    names = set()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~ ]", line)[0].lower())
    return names


def test_pyproject_dependencies_match_requirements():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"]}
    tests = {re.split(r"[<>=!~ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert declared | tests == _requirements()
    assert project["scripts"]["latentflow"] == "latentflow.cli:main"


@pytest.mark.slow
def test_the_wheel_has_the_package_the_command_and_the_assets(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("latentflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "latentflow/cli.py",
        "latentflow/models/dit.py",
        "latentflow/data/folder.py",
        "latentflow/assets/mnist-vae/diffusion_pytorch_model.safetensors",
        "latentflow/assets/digit-classifier/model.safetensors",
        "latentflow/experiments/smoke.yaml",
        "latentflow/commands/train.py",
        "latentflow/training/loop.py",
    ):
        assert expected in names, expected
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "latentflow = latentflow.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
