"""experiments/walkthrough.ipynb: committed with its outputs, and it runs as committed."""

import copy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "walkthrough.ipynb"


def test_the_committed_notebook_keeps_its_outputs_and_uses_the_public_api():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5 and all(c.execution_count for c in code)
    assert all(c.outputs for c in code[1:]), "a cell lost its output: run experiments/maintainer/make_walkthrough.py"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    images = sum(1 for c in code for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 5  # reconstructions, loss curve, three sample grids, the trajectory
    for cell in code:  # the public API only: nothing from latentflow's modules
        assert "from latentflow." not in cell.source and "import latentflow." not in cell.source


@pytest.mark.slow
def test_the_notebook_executes_on_cpu():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    fresh = copy.deepcopy(nb)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(
        fresh, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()  # raises on a failing cell
    last = "".join(o.get("text", "") for o in fresh.cells[-1].outputs)
    assert "accuracy" in last and "mnist-test" in last
