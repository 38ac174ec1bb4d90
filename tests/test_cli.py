"""mopoe-train / mopoe-eval: exit status, boolean parsing, --help, one shared run for every model, reload gives the
same metrics, and torchrun with 2 processes writes one results.json and one checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from mopoe.evaluate import evaluate
from mopoe.train import objective_choices

OBJECTIVES = objective_choices()
from mopoe.train import OPTIONS, load_run, main, main_eval, resolve_config, run

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _flags(d):
    return [a for k, v in d.items() for a in (f"--{k}", str(v))]


def _cli(cmd, *args, timeout=300):
    return subprocess.run([str(BIN / cmd), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, f in OPTIONS.items():
        assert f"--{name}" in text and " ".join(f.metadata["help"].split())[:30] in text, name
    assert "one of: mopoe, mvae, mmvae, subset_elbos" in text and "true|false" in text


@pytest.mark.parametrize("model", OBJECTIVES)
def test_every_model_trains_and_evaluates_through_run(model, data_dir, tmp_path):
    ("Every registered objective trains, evaluates (with the clustering metric and the gmm latent sampler) and writes "
     "results.json through `run` (private latents if it needs).")
    from mopoe.objectives import OBJECTIVES as REG
    private = 4 if getattr(REG[model], "needs_private", False) else 0
    res = run(resolve_config(**TINY, objective=model, private_dim=private, data_dir=str(data_dir),
                             out_dir=str(tmp_path), metrics="latent,coherence,loglik,clustering", latent_sampler="gmm"),
              progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res["results"])) and saved["config"]["objective"] == model
    assert len(saved["metrics"]["latent"]["per_subset"]) == 7 and saved["data"]["sizes"] == {"train": 96, "test": 32}
    m = saved["metrics"]
    gmm = {"sampler": "gmm", "n_components": 10, "fit_samples": 5000, "fitted_on": 96}
    assert m["settings"]["latent_sampler"] == gmm
    assert 0 <= m["coherence"]["joint"] <= 1 and m["n"]["joint"] == 32
    assert all(0 <= s["nmi"] <= 1 for s in m["clustering"]["kmeans"].values())
    assert (sorted(p.name for p in tmp_path.iterdir() if p.name != ".mopoe.lock")
            == ["checkpoint.pt", "metrics.jsonl", "results.json"])


def test_command_succeeds_with_exit_0_and_parses_booleans(data_dir, tmp_path):
    out = tmp_path / "run"
    p = _cli("mopoe-train", *_flags({**TINY, "data_dir": data_dir, "out_dir": out, "resume": "False", "amp": "false"}))
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["resume"] is False and res["config"]["amp"] is False and res["written_by"] == "mopoe-train"
    assert "STAND-IN DATA" in p.stdout and "wrote" in p.stdout
    # resume True with the run finished: trains no more epochs, evaluates again, exit 0
    p = _cli("mopoe-train", *_flags({**TINY, "data_dir": data_dir, "out_dir": out, "resume": "True"}))
    assert p.returncode == 0, p.stderr
    assert [h["epoch"] for h in json.loads((out / "results.json").read_text())["history"]] == [1]


@pytest.mark.parametrize("args, status, message", [
    (["--epochs", "1.5"], 2, "argument --epochs: epochs must be a whole number, got 1.5"),
    (["--beta", "abc"], 2, "argument --beta: beta must be a number, got 'abc'"),
    (["--num_train", "-5"], 2, "mopoe-train: error: num_train must be at least 1 (or None), got -5"),  # a bad option: 2
    (["--seed", "-1"], 2, "mopoe-train: error: seed must be at least 0, got -1"),
    (["--dataset", "mnist_svhn_text", "--num_modalities", "7"], 2, "num_modalities is a PolyMNIST option"),
    (["--resume", "maybe"], 2, "resume must be true or false, got 'maybe'"),
    (["--resume", "true"], 1, "holds no checkpoint"),
])
def test_command_fails_with_one_line_and_creates_nothing(args, status, message, tmp_path):
    p = _cli("mopoe-train", "--out_dir", str(tmp_path / "run"), "--data_dir", str(tmp_path / "data"), *args)
    assert p.returncode == status and message in p.stderr, p.stderr
    if message.startswith("mopoe-train: error") or status == 1: assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_command_refuses_a_folder_that_holds_a_run(data_dir, tmp_path):
    run(resolve_config(**TINY, data_dir=str(data_dir), out_dir=str(tmp_path)), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(_flags({**TINY, "data_dir": data_dir, "out_dir": tmp_path})) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_mopoe_eval_with_the_gmm_sampler_writes_its_own_results_file(data_dir, tmp_path):
    "mopoe-eval --latent_sampler gmm --results_file results.gmm.json: the run's results.json stays as it was."
    out = tmp_path / "run"
    run(resolve_config(**TINY, data_dir=str(data_dir), out_dir=str(out), metrics="coherence"), progress=False)
    before = (out / "results.json").read_bytes()
    prior = json.loads(before)["metrics"]
    assert prior["settings"]["latent_sampler"] == {"sampler": "prior"}
    assert main_eval([str(out), "--latent_sampler", "gmm", "--results_file", "results.gmm.json",
                      "--data_dir", str(data_dir), "--device", "cpu"]) == 0
    assert (out / "results.json").read_bytes() == before
    gmm = json.loads((out / "results.gmm.json").read_text())
    assert gmm["config"]["latent_sampler"] == "gmm" and gmm["written_by"] == "mopoe-eval"
    assert gmm["metrics"]["settings"]["latent_sampler"]["sampler"] == "gmm"
    assert gmm["metrics"]["coherence"]["conditional"] == prior["coherence"]["conditional"]   # no sampler there
    assert 0 <= gmm["metrics"]["coherence"]["joint"] <= 1 and 0 <= prior["coherence"]["joint"] <= 1
    for bad in ("../x.json", "results.txt", ".hidden.json"):
        assert main_eval([str(out), "--results_file", bad, "--data_dir", str(data_dir)]) == 1
    assert sorted(p.name for p in out.iterdir() if p.name != ".mopoe.lock") == [
        "checkpoint.pt", "metrics.jsonl", "results.gmm.json", "results.json"]


def test_reloaded_run_gives_identical_metrics(data_dir, tmp_path):
    res = run(resolve_config(**TINY, data_dir=str(data_dir), out_dir=str(tmp_path / "run")), progress=False)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")                # a copied run folder reloads too
    model, cfg, info, _ = load_run(tmp_path / "copy")
    assert not model.training and cfg.epochs == 1 and list(info.modalities) == ["mnist", "svhn", "text"]
    train_ds, test_ds, _ = res["data"]
    again = evaluate(model, train_ds, test_ds, info, res["classifiers"], loglik_samples=cfg.loglik_samples,
                     max_test=cfg.eval_max_test, loglik_max_test=cfg.loglik_max_test, seed=cfg.seed, progress=False)
    strip = lambda m: {k: v for k, v in m.items() if k != "time"}
    assert strip(again) == strip(res["metrics"])
    # the command evaluates the saved folder the same way (classifiers from the cache)
    assert main_eval([str(tmp_path / "copy"), "--device", "cpu", "--data_dir", str(data_dir)]) == 0
    evaluated = json.loads((tmp_path / "copy" / "results.json").read_text())
    assert evaluated["written_by"] == "mopoe-eval" and strip(evaluated["metrics"]) == strip(res["metrics"])
    assert main_eval([str(tmp_path / "nothing-here")]) == 1


def test_torchrun_two_processes_write_one_results_json_and_one_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mopoe-train"),
           *_flags({**TINY, "epochs": 2, "data_dir": data_dir, "out_dir": out})]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sorted(f.name for f in out.iterdir() if f.name != ".mopoe.lock")
            == sorted(["checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "results.json"]))
    res = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == [1, 2] and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert p.stdout.count("wrote ") == 1 and p.stdout.count("epoch 2/2") == 1          # rank 0 alone logs and writes
    assert load_run(out).state["epoch"] == 2


def test_license_and_metadata_are_real():
    root = Path(__file__).resolve().parents[1]
    lic = (root / "LICENSE").read_text()
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic and "END OF TERMS AND CONDITIONS" in lic
    settings = (root / "settings.ini").read_text()
    assert "license = apache2" in settings and "example.org" not in settings and "example.com" not in settings
