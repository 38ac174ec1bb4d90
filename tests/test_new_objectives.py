"""The successors of issue 29 end to end: each trains through `mopoe.train.run` on a tiny MNIST-SVHN-Text set, is
evaluated (latent, coherence, loglik, clustering), written to results.json and reloaded with `load_run`; MMVM's α
schedule – added by the trainer from `MMVM.run_callbacks` – is stated in every epoch record, survives a resume, and the
reloaded model keeps its α. The objectives and the metric are found by name (the plugin loader's built-ins). The float64
per-tuple references, the masks and the NaN/1e30 leak tests are in the notebooks (nbs/02d_mmvm.ipynb, 02e, 02f, 08b)."""
import json
import math

import pytest
import torch

from conftest import TINY
from mopoe.train import load_run, main, resolve_config, run

SMALL = {**TINY, "num_train": 64, "num_test": 64}          # 2 steps of 32 per epoch
METRICS = "latent,coherence,loglik"


def _config(objective, data_dir, out, **kw):
    kw = {**SMALL, "metrics": METRICS, **kw}
    return resolve_config(**kw, objective=objective, data_dir=str(data_dir), out_dir=str(out))


def _finite_metrics(metrics):
    per = metrics["latent"]["per_subset"]
    assert len(per) == 7 and all(0 <= v["mnist"] <= 1 for v in per.values() if isinstance(v, dict))
    assert set(metrics["coherence"]) >= {"by_size"}
    assert all(0 <= v <= 1 for v in metrics["coherence"]["by_size"]["excl_target"].values())
    assert math.isfinite(metrics["loglik"]["X"]) and metrics["loglik"]["X"] < 0


def _same_loss(model, reloaded, data):
    "The trained and the reloaded model give the same loss terms on a test batch with the same draws."
    x, _ = data[torch.arange(min(32, len(data)))]
    model.eval(); reloaded.eval()
    with torch.no_grad():
        torch.manual_seed(0); a = model.loss(x, beta=1.0)[1]
        torch.manual_seed(0); b = reloaded.loss(x, beta=1.0)[1]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and torch.isfinite(a["loss"]), (a, b)


@pytest.mark.slow
def test_mmvm_trains_evaluates_states_alpha_and_reloads(data_dir, tmp_path):
    cfg = _config("mmvm", data_dir, tmp_path / "run", epochs=2, objective_options="alpha_steps=2")
    res = run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["objective"] == "mmvm" and saved["config"]["objective_options"] == "alpha_steps=2"
    # steps 0, 1 at alpha 1, 0.5; steps 2, 3 at 0: every epoch record states the alpha of its last step
    assert [h["alpha"] for h in saved["history"]] == [0.5, 0.0] and [h["beta"] for h in saved["history"]] == [2.5, 2.5]
    _finite_metrics(saved["metrics"])
    model, cfg2, info, _ = load_run(tmp_path / "run")
    assert type(model.objective).__name__ == "MMVM" and model.objective.alpha_steps == 2
    assert model.objective.alpha.item() == 0.0 == res["model"].objective.alpha.item()
    _same_loss(res["model"], model, res["data"][1])


@pytest.mark.slow
def test_mmvm_alpha_schedule_continues_after_resume(data_dir, tmp_path):
    kw = dict(objective_options="alpha_start=0.9,alpha_end=0.1,alpha_steps=3", metrics="latent")
    whole = _config("mmvm", data_dir, tmp_path / "whole", epochs=3, **kw)
    run(whole, progress=False)
    first = _config("mmvm", data_dir, tmp_path / "parts", epochs=1, **kw)
    run(first, progress=False)
    rest = _config("mmvm", data_dir, tmp_path / "parts", epochs=3, resume=True, **kw)
    run(rest, progress=False)
    hist = [json.loads((tmp_path / d / "results.json").read_text())["history"] for d in ("whole", "parts")]
    expected = [0.9 - 0.8 * min(1.0, s / 3) for s in (1, 3, 5)]           # the last step of each epoch: 1, 3, 5
    for h in hist: assert [r["alpha"] for r in h] == pytest.approx(expected, abs=1e-12)
    assert [r["train_loss"] for r in hist[0]] == pytest.approx([r["train_loss"] for r in hist[1]], rel=1e-6)


def test_mmvm_objective_options_are_checked_by_name():
    from mopoe.mmvm import MMVM
    with pytest.raises(ValueError, match="alpha_start"):
        MMVM.run_callbacks(resolve_config(**SMALL, objective="mmvm", objective_options="alpha_start=3"))
    with pytest.raises(ValueError, match="alpha_steps"):
        MMVM.run_callbacks(resolve_config(**SMALL, objective="mmvm", objective_options="alpha_steps=-2"))
    with pytest.raises(ValueError, match="'mmvm' takes alpha_start, alpha_end, alpha_steps"):
        resolve_config(**SMALL, objective="mmvm", objective_options="K=3")


@pytest.mark.slow
def test_mmvm_through_the_command(data_dir, tmp_path):
    "mopoe-train --objective mmvm with a fixed alpha; the reloaded model keeps it."
    args = {**SMALL, "objective": "mmvm", "objective_options": "alpha_steps=0,alpha_end=0.25", "metrics": "latent",
            "data_dir": data_dir, "out_dir": tmp_path / "cli"}
    assert main([a for k, v in args.items() for a in (f"--{k}", str(v))]) == 0
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["written_by"] == "mopoe-train" and saved["config"]["objective"] == "mmvm"
    assert load_run(tmp_path / "cli").model.objective.alpha.item() == 0.25


@pytest.mark.slow
def test_code_vae_trains_evaluates_and_reloads_its_subset_weights(data_dir, tmp_path):
    cfg = _config("code_vae", data_dir, tmp_path / "run", objective_options="rho=0.4,entropy_weight=1.0", lr=0.05)
    res = run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["objective"] == "code_vae"
    assert saved["config"]["objective_options"] == "entropy_weight=1.0,rho=0.4"
    _finite_metrics(saved["metrics"])
    h = saved["history"][0]
    assert h["train_weight_max"] > h["train_weight_min"] > 0 and 0 < h["train_weights_entropy"] <= math.log(7) + 1e-6
    model, _, _, _ = load_run(tmp_path / "run")
    assert type(model.objective).__name__ == "CoDEVAE" and model.objective.rho == 0.4
    trained = res["model"].objective.subset_weights().detach()
    assert torch.equal(model.objective.subset_weights().detach(), trained) and trained.max() > trained.min()
    _same_loss(res["model"], model, res["data"][1])


@pytest.mark.slow
def test_cmvae_trains_evaluates_reloads_predicts_and_prunes_clusters(data_dir, tmp_path):
    from mopoe.cmvae import predict_clusters, prune_clusters
    cfg = _config("cmvae", data_dir, tmp_path / "run", private_dim=4, objective_options="num_clusters=5")
    res = run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["objective"] == "cmvae" and saved["history"][0]["train_clusters_active"] == 5
    _finite_metrics(saved["metrics"])
    model, _, _, _ = load_run(tmp_path / "run")
    assert type(model.objective).__name__ == "CMVAE" and model.objective.num_clusters == 5
    assert torch.equal(model.objective.cluster_means.detach(), res["model"].objective.cluster_means.detach())
    _same_loss(res["model"], model, res["data"][1])
    x, y = res["data"][1][torch.arange(32)]
    clusters, post = predict_clusters(model, x)
    assert clusters.shape == (32,) and post.shape == (5, 3, 32) and clusters.max() < 5
    h = prune_clusters(model, res["data"][0], beta=cfg.beta, batch_size=32)
    assert sorted(h) == [2, 3, 4, 5] and int(model.objective.cluster_active.sum()) == min(h, key=h.get)


@pytest.mark.slow
def test_clustering_metric_through_run_for_a_baseline_and_cmvae(data_dir, tmp_path):
    "metrics=...,clustering: k-means scores for every objective (MoPoE here), and CMVAE's own clusters beside them."
    for objective, private, opts in (("mopoe", 0, ""), ("cmvae", 4, "num_clusters=5")):
        cfg = _config(objective, data_dir, tmp_path / objective, metrics="latent,clustering", private_dim=private,
                      objective_options=opts)
        run(cfg, progress=False)
        res = json.loads((tmp_path / objective / "results.json").read_text())["metrics"]["clustering"]
        assert res["k"] == 10 and res["n"] == 64 and list(res["kmeans"]) == ["mnist", "svhn", "text", "mnist,svhn,text"]
        for s in res["kmeans"].values():
            assert 0 <= s["accuracy"] <= 1 and -1 <= s["ari"] <= 1 and 0 <= s["nmi"] <= 1 and s["clusters"] == 10
        assert ("own" in res) == (objective == "cmvae")
        if objective == "cmvae": assert 1 <= res["own"]["clusters"] <= 5 and 0 < res["own"]["accuracy"] <= 1
