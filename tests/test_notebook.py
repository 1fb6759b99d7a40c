"""notebooks/kernels.ipynb runs top to bottom at its small size (NBMOE_NOTEBOOK_SMALL=1)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient


@pytest.mark.slow
def test_kernels_notebook_runs():
    path = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "kernels.ipynb"
    notebook = nbformat.read(path, as_version=4)
    os.environ["NBMOE_NOTEBOOK_SMALL"] = "1"
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    finally:
        del os.environ["NBMOE_NOTEBOOK_SMALL"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "route " in text and "roofline" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2       # the two figures
