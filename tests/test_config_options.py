"""The run options declared beside what reads them (issue 27): TrainConfig is the run's own options plus the built-in
metrics', one dataclass; the run keys are those of before the move, so every run folder keeps its name and every
stored result its key."""
import dataclasses
import json
import pickle
from pathlib import Path

import pytest

import mopoe.train
from mopoe.config import (
    METRIC_OPTIONS,
    OPTIONS,
    ConfigError,
    CoreConfig,
    TrainConfig,
    config_key,
    resolve_config,
    stored_options,
)
from mopoe.evaluate import Coherence, LogLikelihood
from mopoe.fid import FID
from mopoe.metric import METRICS, Metric, register_metric
from mopoe.options import option
from mopoe.samplers import SAMPLER_OPTIONS

ROOT = Path(__file__).resolve().parents[1]

# computed before the options moved (commit a4078ac): resolve_config(**options) -> config_key
KEYS = [
    (dict(dataset="polymnist"), "a3396f3c1f"),          # results/preset/polymnist_mopoe_beta1-a3396f3c1f
    ({}, "19ebfdd887"),
    (dict(fid_samples=7, fid_protocol="png", fid_weights="/no/such.pth"), "19ebfdd887"),   # FID not chosen: no effect
    (dict(dataset="polymnist", metrics="latent,coherence,loglik,fid", fid_samples=100, fid_protocol="png"),
     "3969a0a446"),
    (dict(dataset="polymnist", metrics="latent,loglik", classifiers_from="/tmp/nowhere", latent_sampler="gmm",
          loglik_samples=3, loglik_max_test=50, classifier_epochs=2), "07e99a76ab"),
    (dict(dataset="polymnist", preset="paper", objective="mmvaeplus"), "b3446e27ea"),
]


@pytest.mark.parametrize("options, key", KEYS)
def test_run_keys_are_those_of_before_the_move(options, key):
    assert config_key(resolve_config(**options)) == key


def test_stored_results_load_and_keep_their_keys():
    files = sorted(ROOT.glob("results/**/results*.json"))
    assert len(files) >= 50
    for f in files:
        res = json.loads(f.read_text())
        cfg = resolve_config(stored_options(res["config"]))
        assert config_key(cfg) == res["config_key"], f


def test_train_config_is_the_core_options_then_the_metrics():
    assert list(METRIC_OPTIONS) == ["classifier_epochs", "classifiers_from", "loglik_samples", "loglik_max_test",
                                    "fid_samples", "fid_weights", "fid_protocol", "latent_sampler"]
    assert list(OPTIONS) == [f.name for f in dataclasses.fields(CoreConfig)] + list(METRIC_OPTIONS)
    owners = {**Coherence.options, **LogLikelihood.options, **FID.options, **SAMPLER_OPTIONS}
    assert all(OPTIONS[n] is f for n, f in owners.items())                 # the declarations themselves
    assert TrainConfig.__module__ == "mopoe.config" and TrainConfig.__qualname__ == "TrainConfig"
    assert mopoe.train.TrainConfig is TrainConfig and mopoe.train.option is option
    cfg = resolve_config(dataset="polymnist", fid_samples=9)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and dataclasses.replace(cfg, seed=3).fid_samples == 9


def test_a_plugin_metric_with_options_of_its_own_is_refused_by_name():
    @register_metric
    class OwnOptions(Metric):
        name, options = "own_options_test", {"own_k": option(3, "its own k", type=int)}
        def end(self, ctx): return {}
    try:
        with pytest.raises(ConfigError, match=r"metric 'own_options_test' declares options \['own_k'\]"):
            resolve_config(metrics="latent,own_options_test")
        resolve_config(metrics="latent")                                 # not chosen: nothing to refuse
    finally:
        del METRICS["own_options_test"]
