"""The notebooks in ``notebooks/`` run end to end on demo data and compute the right numbers.

``phase_map_exploration.ipynb`` is executed with nbclient in a kernel of the interpreter
running the tests (jupyter_client starts ``python`` kernels with ``sys.executable``), with
``XRDMAP_RESULT`` unset so that it simulates the multilayer demo scan itself, in a
temporary directory given by ``XRDMAP_DEMO_DIR``. Any cell error fails the test. The
numbers it prints as JSON (the re-run phase fractions) are checked against the simulator's
ground truth read independently from the scan file (``/entry/truth/phase_fraction``).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "phase_map_exploration.ipynb"
JSON_TAG = "rerun-fractions"


def _tagged_cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"
    assert "XRDMAP_RESULT" in code[0].source, "the first code cell must read the result path from XRDMAP_RESULT"
    _tagged_cell(nb, JSON_TAG)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed on a freshly simulated demo scan, and that scan's folder."""
    import os

    work = tmp_path_factory.mktemp("notebook")
    demo = work / "demo"
    env = {"XRDMAP_DEMO_DIR": str(demo), "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in (*env, "XRDMAP_RESULT")}
    os.environ.pop("XRDMAP_RESULT", None)
    os.environ.update(env)  # the kernel inherits the environment of this process
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        )
        client.execute()  # raises CellExecutionError naming the cell on any error
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, demo


@pytest.mark.slow
def test_phase_map_notebook_runs_and_draws(executed):
    nb, demo = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    # fractions, I(Q) log + contrast, G(r), NMF weights and components in Q and r,
    # the point's I(Q) and G(r), the comparison of phase lists
    assert len(images) >= 11
    assert (demo / "result.h5").is_file()


@pytest.mark.slow
def test_phase_map_notebook_rerun_fractions_match_the_truth(executed):
    nb, demo = executed
    text = "".join(o.get("text", "") for o in _tagged_cell(nb, JSON_TAG).outputs if o.output_type == "stream")
    summary = json.loads(text.strip().splitlines()[-1])
    assert Path(summary["scan_source"]).resolve() == (demo / "scan.h5").resolve()

    with h5py.File(demo / "scan.h5", "r") as fh:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in fh["entry/truth/phase"][()]]
        truth = np.asarray(fh["entry/truth/phase_fraction"][()], dtype=float)
        position = np.asarray(fh["entry/truth/position"][()], dtype=float)
    np.testing.assert_allclose(summary["scan"], position, atol=1e-9)

    for key in ("fractions_rerun", "fractions_rerun_user"):
        f = np.asarray(summary[key], dtype=float)
        assert f.shape == (len(position), len(summary[key.replace("fractions", "phases")]))
        assert np.all((f >= 0) & (f <= 1))
        np.testing.assert_allclose(f.sum(axis=1), 1.0, atol=1e-4)  # 5 decimals per value

    phases = summary["phases_rerun"]
    rerun = np.asarray(summary["fractions_rerun"], dtype=float)
    assert set(phases) <= set(names), "the re-run list is the simulated multilayer's phases"
    truth = truth[:, [names.index(p) for p in phases]]

    # in the LATP electrolyte layer (true LATP > 80 wt%) the dominant phase is LATP
    layer = truth[:, phases.index("LATP")] > 0.8
    assert layer.sum() >= 3
    assert all(phases[j] == "LATP" for j in np.argmax(rerun[layer], axis=1))
    # in the composite layers the doped anti-NASICON phase and eps-LiVOPO4 follow the truth
    np.testing.assert_allclose(rerun, truth, atol=0.1)
    assert np.mean(np.abs(rerun - truth)) < 0.04
    for p in ("anti-NASICON", "eps-LiVOPO4"):
        j = phases.index(p)
        assert np.corrcoef(rerun[:, j], truth[:, j])[0, 1] > 0.9

    # the user CIF (berlinite AlPO4) is not in the simulated pellet: not detected
    user = np.asarray(summary["fractions_rerun_user"], dtype=float)
    extra = [j for j, p in enumerate(summary["phases_rerun_user"]) if p not in phases]
    assert len(extra) == 1
    assert user[:, extra[0]].max() < 0.03
