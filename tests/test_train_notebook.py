"""The training notebook runs through papermill on a tiny setting for every dataset and model and writes results.json."""
import json
from pathlib import Path

import papermill as pm
import pytest

NB = Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"
MODELS = ("mopoe", "mvae", "mmvae", "subset_elbos")
DATASETS = ("polymnist", "mnist_svhn_text", "celeba")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")          # shared: datasets and classifiers are built once


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_train_notebook(dataset, model, data_dir, tmp_path):
    out_dir = tmp_path / "run"
    params = dict(dataset=dataset, model=model, epochs=1, batch_size=32, num_train=96, num_test=32, data_dir=str(data_dir),
                  out_dir=str(out_dir), classifier_epochs=1, num_samples=3, device="cpu", seed=1)
    if dataset == "polymnist": params["num_modalities"] = 3
    pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False, kernel_name="python3")
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["model"] == model and res["config"]["dataset"] == dataset and res["config"]["epochs"] == 1
    assert res["data"]["train"] == 96 and res["data"]["test"] == 32
    assert (out_dir / "checkpoint.pt").exists() and len((out_dir / "metrics.jsonl").read_text().splitlines()) == 1
    m = res["metrics"]
    num_subsets = 2 ** len(res["data"]["modalities"]) - 1
    assert len(m["latent"]["per_subset"]) == num_subsets and len(m["loglik"]["X_with_proposal_from"]) == num_subsets
    assert all(-1e7 < v < 0 for v in m["loglik"]["X_with_proposal_from"].values())
    joint = m["coherence"]["joint"] if dataset != "celeba" else m["coherence"]["joint_attribute_agreement"]
    assert 0.0 <= joint <= 1.0                                # CelebA: 40 attributes, no single joint label


def test_bad_parameter_is_rejected_with_choices(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="mopoe, mvae, mmvae, subset_elbos"):
        pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=dict(model="poe"), progress_bar=False,
                            kernel_name="python3")


def test_sweep_notebook_collects_figures(data_dir, tmp_path):
    runs = tmp_path / "runs"
    tiny = dict(epochs=1, batch_size=32, num_train=64, num_test=32, classifier_epochs=1, num_samples=2, device="cpu")
    pm.execute_notebook(str(NB.with_name("sweep.ipynb")), str(tmp_path / "sweep_out.ipynb"), progress_bar=False,
                        kernel_name="python3", cwd=str(NB.parent),
                        parameters=dict(dataset="mnist_svhn_text", models=["mopoe", "mmvae"], betas=[1.0, 5.0],
                                        runs_dir=str(runs), data_dir=str(data_dir), train_params=tiny))
    found = sorted(p.parent.name for p in runs.glob("*/results.json"))
    assert found == ["mnist_svhn_text_mmvae_beta1", "mnist_svhn_text_mmvae_beta5",
                     "mnist_svhn_text_mopoe_beta1", "mnist_svhn_text_mopoe_beta5"]
    out = json.loads((tmp_path / "sweep_out.ipynb").read_text())
    images = [o for c in out["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2                                   # Figure 1 and Figure 3
