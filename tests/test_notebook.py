"""The quick-start notebook runs top to bottom (nbclient, this interpreter's kernel) on the tiny run."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_notebook_is_committed_without_outputs():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes_on_a_tiny_run(tiny_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("JEPA_NB_WORKDIR", tiny_run)
    monkeypatch.setenv("JEPA_NB_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "pooled (" in text and "best {" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 2  # the PCA figure and the probe plot
