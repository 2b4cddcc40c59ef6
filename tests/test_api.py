"""The public Python API and the README's snippet of it (which tests/test_packaging.py runs
with the installed wheel)."""

import re
from pathlib import Path

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


# The snippet itself runs with the installed wheel, outside the checkout: tests/test_packaging.py.
