"""The notebooks run top to bottom (nbclient, this interpreter's kernel) with tiny settings."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
WORLD_MODEL_NOTEBOOK = os.path.join(REPO, "notebooks", "world_model.ipynb")


@pytest.mark.parametrize("path", [NOTEBOOK, WORLD_MODEL_NOTEBOOK])
def test_notebook_is_committed_without_outputs(path):
    import nbformat
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def execute(path):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    return text, images


@pytest.mark.slow
def test_notebook_executes_on_a_tiny_run(tiny_run, monkeypatch):
    monkeypatch.setenv("JEPA_NB_WORKDIR", tiny_run)
    monkeypatch.setenv("JEPA_NB_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    text, images = execute(NOTEBOOK)
    assert "pooled (" in text and "best {" in text
    assert len(images) == 2  # the PCA figure and the probe plot


@pytest.mark.slow
def test_world_model_notebook_executes_with_tiny_settings(tmp_path, world_dir, tiny_run, monkeypatch):
    monkeypatch.setenv("JEPA_NB_ENCODER", tiny_run)
    monkeypatch.setenv("JEPA_NB_WORKDIR", str(tmp_path / "wm"))
    monkeypatch.setenv("JEPA_NB_DATA_DIR", world_dir)
    monkeypatch.setenv("JEPA_NB_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    text, images = execute(WORLD_MODEL_NOTEBOOK)
    assert "trained to step 30" in text and "distance to the goal" in text and "surprise at the event" in text
    assert "the gate refused" in text and "block 0: " in text
    assert len(images) == 3  # episode frames, the energy/distance/surprise curves, the teleport plot
