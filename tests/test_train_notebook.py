"""train.ipynb and sweep.ipynb through papermill: a short run learns, results.json holds what the notebook shows,
the parameters cell is the configuration's declaration, nbdev_test skips the heavy notebooks, sweeps never mix runs."""
import ast
import json
import re
from pathlib import Path

import papermill as pm
import pytest

from conftest import SHORT
from mopoe.evaluate import results_tables
from mopoe.train import OPTIONS, TrainConfig, resolve_config

NB = Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"
SWEEP = NB.with_name("sweep.ipynb")


def _execute(nb, out, **params):
    pm.execute_notebook(str(nb), str(out), parameters=params, progress_bar=False, kernel_name="python3")
    return json.loads(Path(out).read_text())


def _outputs(nb):
    "(stream text, text/plain displays, text/html displays) of an executed notebook."
    streams, plain, html = [], [], []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if o["output_type"] == "stream": streams.append("".join(o["text"]))
            if "text/plain" in o.get("data", {}): plain.append("".join(o["data"]["text/plain"]))
            if "text/html" in o.get("data", {}): html.append("".join(o["data"]["text/html"]))
    return "".join(streams), plain, html


def test_parameters_cell_is_the_declaration():
    "Every declared option, with its default, is in the parameters cell and nothing else: a new one is added there."
    nb = json.loads(NB.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    params = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body}
    assert list(params) == list(OPTIONS), f"cell and TrainConfig differ: {set(params) ^ set(OPTIONS)}"
    assert params == {k: f.default for k, f in OPTIONS.items()}
    resolve_config(TrainConfig(**params))


def test_plain_nbdev_test_skips_the_training_notebooks():
    from nbdev.test import test_nb
    for nb in (NB, SWEEP):
        ok, seconds = test_nb(nb)
        assert ok and seconds == 0, f"nbdev_test would execute {nb.name}"


def test_short_run_learns_and_results_json_holds_what_was_shown(data_dir, tmp_path):
    out_dir = tmp_path / "run"
    out = _execute(NB, tmp_path / "out.ipynb", **SHORT, data_dir=str(data_dir), out_dir=str(out_dir))
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"] == {**res["config"], **SHORT, "out_dir": str(out_dir)} and res["written_by"] == "notebook"
    assert res["data"]["sizes"] == {"train": 4000, "test": 500}
    assert res["data"]["stand_in"] and res["data"]["synthetic"] == ["svhn"]
    # it learned: the text expert's latent code tells the digit (chance 0.1; an untrained model's text code gives 0.07),
    # and the loss of the last steps is well below that of the first ones
    lat = res["metrics"]["latent"]["per_subset"]
    assert lat["text"] > 0.25 and lat["mnist,text"] > 0.4, lat
    steps = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])["step_losses"]
    assert len(steps) == 32 and sum(steps[-5:]) < 0.7 * sum(steps[:5]), steps
    # what the notebook displayed is what results.json holds (the tables are rebuilt from the file)
    streams, plain, html = _outputs(out)
    for name, table in results_tables(res["metrics"]).items():          # (HTML: independent of the terminal's width)
        if name != "time": assert table._repr_html_() in html, f"the {name} table shown differs from results.json"
    # labelled as a run on stand-in data: first output, the comparison with the paper, the file
    first = next(o for c in out["cells"] for o in c.get("outputs", [])
                 if o["output_type"] == "stream" and o["name"] == "stdout")
    assert "".join(first["text"]).startswith("STAND-IN DATA: mnist_svhn_text")
    assert any("ours (this run, STAND-IN data: a smoke run)" in p for p in plain)
    # progress renders as a handful of lines, not a line per step
    assert "IProgress" not in streams and len(streams.splitlines()) < 30, streams


@pytest.mark.parametrize("dataset", ["polymnist", "celeba"])
def test_other_datasets_run(dataset, data_dir, tmp_path):
    params = dict(dataset=dataset, epochs=1, batch_size=32, num_train=96, num_test=32, data_dir=str(data_dir),
                  out_dir=str(tmp_path / "run"), classifier_epochs=1, loglik_samples=2, loglik_max_test=8, device="cpu")
    if dataset == "polymnist": params["num_modalities"] = 3
    _execute(NB, tmp_path / "out.ipynb", **params)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    M = len(res["data"]["modalities"])
    assert res["data"]["name"] == dataset and M == (3 if dataset == "polymnist" else 2)
    assert (len(res["metrics"]["latent"]["per_subset"]) == 2 ** M - 1
            == len(res["metrics"]["loglik"]["X_with_proposal_from"]))
    assert [h["epoch"] for h in res["history"]] == [1]


@pytest.mark.parametrize("params, message", [
    (dict(objective="poe"), "choose one of: mopoe, mvae, mmvae, subset_elbos"),
    (dict(bta=5), "unknown notebook parameter(s) ['bta']"),
    (dict(beta="abc"), "beta must be a number, got 'abc'"),
    (dict(num_train=0), "num_train must be at least 1 (or None), got 0"),
])
def test_bad_parameter_is_refused_before_any_work(params, message, tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=re.escape(message)):
        _execute(NB, tmp_path / "out.ipynb", **params, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_sweep_keys_folders_by_config_and_refuses_a_mismatched_one(data_dir, tmp_path):
    runs = tmp_path / "runs"
    tiny = dict(epochs=1, batch_size=32, num_train=96, num_test=32, classifier_epochs=1, loglik_samples=2,
                loglik_max_test=8, device="cpu")              # the sizes of conftest.TINY: the data cache is shared
    params = dict(dataset="mnist_svhn_text", models=["mopoe"], betas=[2.0], runs_dir=str(runs), data_dir=str(data_dir),
                  train_params=tiny)
    out = _execute(SWEEP, tmp_path / "sweep_out.ipynb", **params)
    found = sorted(p.parent.name for p in runs.glob("*/results.json"))
    assert [f.split("-")[0] for f in found] == ["mnist_svhn_text_mopoe_beta2"]
    images = [o for c in out["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2                                   # Figure 1 and Figure 3
    assert all(len(f.split("-")[1]) == 10 for f in found)       # <readable name>-<config key>
    # a folder whose results.json holds another configuration is refused, naming what differs
    f = runs / found[0] / "results.json"
    r = json.loads(f.read_text()); r["config"]["epochs"] = 7; f.write_text(json.dumps(r))
    with pytest.raises(pm.PapermillExecutionError,
                       match=r"holds the results of another configuration: \{'epochs': \(7, 1\)\}"):
        _execute(SWEEP, tmp_path / "sweep_out2.ipynb", **{**params, "run_missing": False})
    # a model name that would leave runs_dir is refused before anything is created
    with pytest.raises(pm.PapermillExecutionError, match="unknown objective '../../x'"):
        _execute(SWEEP, tmp_path / "sweep_out3.ipynb",
                 **{**params, "models": ["../../x"], "runs_dir": str(tmp_path / "r2")})
    assert not (tmp_path / "r2").exists() and not (tmp_path.parent / "x").exists()
