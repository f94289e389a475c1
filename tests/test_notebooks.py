"""Runs every notebook in notebooks/ from top to bottom in a fresh kernel.

A cell that raises (including a failed ``assert`` in the notebook) fails the test, with the
cell's traceback in the report. The notebooks are also checked to be saved without outputs.

The kernel runs with ``FNN_NOTEBOOK_QUICK=1`` in its environment: a notebook that trains for
minutes at its full settings (the GAN and diffusion ones) reads it in its first code cell and
runs its short settings instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_saved_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} have saved outputs; clear them"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("FNN_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    # a notebook that needs an optional extra says so in its metadata: {"fnn": {"requires":
    # ["torch", ...]}} (the PyTorch interop one needs the interop extra)
    missing = [name for name in nb.metadata.get("fnn", {}).get("requires", [])
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)} (not installed: pip install -e "
                    f"'.[interop]')")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
