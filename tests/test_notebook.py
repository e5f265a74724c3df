"""notebooks/demo.ipynb runs clean top to bottom."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_notebook_runs_clean():
    nb = nbformat.read(ROOT / "notebooks" / "demo.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # the NMI cell: the four photo families are found
    nmi_cell = next(c for c in nb.cells if "normalized_mutual_info_score" in c.source)
    nmi = float(nmi_cell.outputs[0]["data"]["text/plain"])
    assert nmi > 0.6
