"""The notebooks execute top to bottom (nbclient) on the bundled models; where their weights are absent, on
random-weight stand-ins of the same architecture instead, so that the notebooks' code is always checked."""

from pathlib import Path

import pytest

from difcache.models import available

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("weights", ["bundled", "random"])
@pytest.mark.parametrize("name", ["quickstart", "tradeoffs"])
def test_notebook_executes(name, weights, tmp_path, monkeypatch):
    have_weights = "dit" in available()
    if weights == "bundled" and not have_weights:
        pytest.skip("bundled weights missing (dit.safetensors): train with scripts/train_bundled.py dit")
    if weights == "random" and have_weights:
        pytest.skip("bundled weights present: the run on them covers this notebook")
    monkeypatch.setenv("DIFCACHE_NOTEBOOK_WEIGHTS", weights)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if weights == "random":  # plumbing only: fewer steps and samples
        monkeypatch.setenv("DIFCACHE_NOTEBOOK_STEPS", "8")
        monkeypatch.setenv("DIFCACHE_NOTEBOOK_SAMPLES", "8")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
