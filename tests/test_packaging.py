"""The installable package: pyproject's dependencies match requirements.txt (CI installs
that file), and a built wheel carries the code, the `latentflow` command and the assets,
and, installed, runs the built-in experiments and the README's snippet outside the checkout."""

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.test_api import readme_snippet

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

    # installed with --no-deps into a fresh venv that sees this interpreter's packages (torch is
    # not installed again), then used from a directory that is not the checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "parent-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args):
        proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    assert "train-vae" in run(str(venv / "bin" / "latentflow"), "--help")
    out = run(
        str(venv / "bin" / "latentflow"), "--config", "smoke", "--set", "train.epochs=1", "--set", "train.log_with=none"
    )
    assert "done: runs/smoke-" in out and (elsewhere / "runs").is_dir()
    # the README's Python snippet, as written, with the installed package
    check = """
import latentflow, pathlib
assert pathlib.Path(latentflow.__file__).is_relative_to(pathlib.Path(__import__('sys').prefix)), latentflow.__file__
assert run_dir.parent == pathlib.Path("runs") and (run_dir / "export" / "model_index.json").is_file()
assert len(images) == 2 and images[0].size == (32, 32)
assert 0 <= report["accuracy"] <= 1 and (run_dir / "eval").is_dir() and check["psnr"] > 25
print("snippet ok")
"""
    assert "snippet ok" in run(str(python), "-c", readme_snippet("python-api") + check)
