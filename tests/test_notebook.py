"""notebooks/walkthrough.ipynb runs top to bottom on the tiny model and shows what it claims to show.

Needs the TruthfulQA file at ../shared/data (as CI has it; SVD_LIGHTNING_DATA points there); without it
the notebook fails loudly.
"""

import math
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WALKTHROUGH = NOTEBOOKS / "walkthrough.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    assert nb.cells[1].cell_type == "code" and 'MODEL = "tiny-random"' in nb.cells[1].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_walkthrough_runs_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's run directory (tempfile.mkdtemp) lands here
    monkeypatch.setenv("SVD_LIGHTNING_DATA", str(NOTEBOOKS.parents[1] / "shared" / "data"))  # the kernel runs in notebooks/
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    # execute() raises CellExecutionError (with the traceback) as soon as a cell errors.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "\n".join(_text(c) for c in code)

    mu = re.search(r"^μ̄ = ([+-]\d+\.\d+)\s+\(strength=", text, re.M)
    assert mu, "the strength cell should print μ̄"
    assert math.isfinite(float(mu.group(1)))
    for key in ("mean_identity", "median_fisher", "pooled_fisher", "exact", "kl_mean"):
        assert re.search(rf"^{key}\s+[-+0-9.e]+$", text, re.M), key

    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 2, "μ* histogram and top-10 bar plot"

    assert len(re.findall(r"^  plain   : ", text, re.M)) == 2
    assert len(re.findall(r"^  steered : ", text, re.M)) == 2

    assert "+SVDecode" in text and "pre-trained" in text and "warm start" in text
    for variant in ("plain", "base", "steered"):
        value = re.search(rf"^val/mc2_{variant}\s+([-0-9.]+)$", text, re.M)
        assert value and 0.0 <= float(value.group(1)) <= 1.0, variant
    assert list(tmp_path.glob("svdecode-*/version_0/steering.json")), "the run was written to the temp dir"
    logged = re.search(r"^val/mu\s+([-0-9.]+)$", text, re.M)
    assert logged and abs(float(logged.group(1)) - float(mu.group(1))) < 1e-3, "validation used the solved μ̄"
