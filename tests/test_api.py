"""The public Python API, as the README shows it: its snippet runs as written."""

import re
from pathlib import Path

import pytest

import latentflow

REPO = Path(__file__).resolve().parents[1]


def test_public_names():
    for name in (
        "LatentFlowPipeline",
        "train",
        "load_config",
        "ExperimentConfig",
        "evaluate_model",
        "reconstruction_check",
        "generate",
        "export",
        "load_pipeline",
        "Runtime",
    ):
        assert name in latentflow.__all__ and hasattr(latentflow, name)


def readme_snippet(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: built-in experiments are found by name
    scope = {}
    exec(compile(readme_snippet("python-api"), "README.md", "exec"), scope)
    run_dir = scope["run_dir"]
    assert run_dir.parent == Path("runs") and (run_dir / "export" / "model_index.json").is_file()
    assert len(scope["images"]) == 2 and scope["images"][0].size == (32, 32)
    assert 0 <= scope["report"]["accuracy"] <= 1 and (run_dir / "eval").is_dir()
    assert scope["check"]["psnr"] > 25
