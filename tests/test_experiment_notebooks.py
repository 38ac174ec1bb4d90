"""reproduce.ipynb and incomplete.ipynb from the committed results/: they render, and the files the README quotes are
regenerated from the run folders exactly (on a copy of results/, so the repository is never written)."""
import json
import shutil
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_repo_results(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "settings.ini", root / "settings.ini")
    shutil.copytree(ROOT / "results", root / "results", ignore=shutil.ignore_patterns("*.pt"))
    return root


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


THREE_THOUSAND = {"epochs": 24, "compare_dir": "results/compare_3000", "tag": "_3000"}  # PolyMNIST's 3,000-step render


@pytest.mark.parametrize("dataset, params", [("mnist_svhn_text", {}), ("polymnist", {"epochs": 8}),
                                             ("polymnist", THREE_THOUSAND)])
def test_reproduce_regenerates_the_committed_claims(tmp_path, dataset, params):
    root = _copy_repo_results(tmp_path)
    name = dataset + params.get("tag", "")                                     # the tables' names: <kind>_<name>.csv
    (root / "results" / f"claims_{name}.csv").unlink()
    for kind in ("claims_successors", "comparison", "beta"):
        (root / "results" / f"{kind}_{name}.csv").unlink(missing_ok=True)
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(ROOT / "nbs" / "reproduce.ipynb"), str(out), progress_bar=False, kernel_name="python3",
                        parameters=dict(dataset=dataset, root=str(root), **params), cwd=str(tmp_path))
    nb = json.loads(out.read_text())
    assert _images(nb) >= 2                                                     # Figure 3 and the heatmaps
    made = pd.read_csv(root / "results" / f"claims_{name}.csv")
    committed = pd.read_csv(ROOT / "results" / f"claims_{name}.csv")
    pd.testing.assert_frame_equal(made, committed)                             # the README's claims come from the runs
    for kind in ("claims_successors", "comparison", "beta"):                  # the successors' comparison, where it ran
        table = ROOT / "results" / f"{kind}_{name}.csv"
        if table.exists():
            pd.testing.assert_frame_equal(pd.read_csv(root / "results" / table.name), pd.read_csv(table))


def test_incomplete_notebook_collects_the_committed_runs(tmp_path):
    root = _copy_repo_results(tmp_path)
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(ROOT / "nbs" / "incomplete.ipynb"), str(out), progress_bar=False, kernel_name="python3",
                        parameters=dict(runs_dir=str(root / "results" / "incomplete")), cwd=str(tmp_path))
    nb = json.loads(out.read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "runs" in text and _images(nb) >= 2                                  # both figures rendered
