"""The metric interface of mopoe.evaluate: registry, configuration, one shared pass, a metric written outside it."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mopoe.evaluate import (
    DEFAULT_METRICS,
    METRICS,
    EvalContext,
    LogLikelihood,
    Metric,
    evaluate,
    get_metric,
    register_metric,
)

class _Tuples(torch.utils.data.Dataset):
    "n tuples of 3 modalities: 3 * onehot(label) plus noise, the same coordinates in every modality."
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(10, (n,), generator=g)
        v = 3 * torch.nn.functional.one_hot(self.y, 10).float()
        self.x = {m: v + 0.3 * torch.randn(n, 10, generator=g) for m in ("m0", "m1", "m2")}
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {m: t[i] for m, t in self.x.items()}, self.y[i]


_INFO = SimpleNamespace(name="toy", modalities=["m0", "m1", "m2"], multilabel=False,
                        label_names=[str(i) for i in range(10)])


class _Model(nn.Module):
    "Counts encoder passes; its subset means are the average of the subset's inputs; cond_generate echoes the batch."
    modalities = ["m0", "m1", "m2"]
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(1)); self.encoded = 0
    def experts(self, x):
        self.encoded += 1
        mu = torch.stack([x[m] for m in self.modalities])
        return mu, torch.zeros_like(mu), torch.ones(3, dtype=torch.bool), {}
    def subset_means(self, x, mask=None, experts=None):
        from mopoe.experts import subset_mask
        mask = subset_mask(3) if mask is None else mask
        v = torch.stack([x[m] for m in self.modalities])
        return torch.einsum("sm,mbd->sbd", mask.float(), v) / mask.sum(1)[:, None, None]
    def cond_generate(self, x, num_samples=None, given=None, experts=None): return {m: t.clone() for m, t in x.items()}


class _Recorder(Metric):
    "A metric written outside the package: records the hooks it sees and whether the encoding is shared."
    name = "recorder_test"
    def __init__(self): self.calls = []
    def begin(self, ctx): self.calls.append(("begin", len(ctx.test_ds), ctx.names[-1]))
    def batch(self, ctx, x, y, experts):
        assert torch.equal(experts[0], torch.stack([x[m] for m in ctx.modalities]))
        self.calls.append(("batch", len(y)))
    def end(self, ctx):
        self.calls.append(("end",)); ctx.n["recorder_test"] = sum(c[1] for c in self.calls if c[0] == "batch")
        return {"batches": sum(c[0] == "batch" for c in self.calls)}


@pytest.fixture
def recorder():
    cls = register_metric(_Recorder)
    yield cls
    METRICS.pop(cls.name, None)


def test_defaults_are_registered():
    assert DEFAULT_METRICS == ("latent", "coherence", "loglik") and all(n in METRICS for n in DEFAULT_METRICS)
    assert METRICS["coherence"].needs_classifiers and not METRICS["latent"].needs_classifiers


def test_custom_metric_one_pass_one_encoding(recorder):
    model, train, test = _Model(), _Tuples(200, 1), _Tuples(100, 2)
    m = recorder()
    r = evaluate(model, train, test, _INFO, metrics=["latent", m], batch_size=32, num_latent_train=100, progress=False)
    assert m.calls == [("begin", 100, "m0,m1,m2"), ("batch", 32), ("batch", 32), ("batch", 32), ("batch", 4), ("end",)]
    assert model.encoded == 4                                      # one encoder pass per batch, shared by both metrics
    assert r["recorder_test"] == {"batches": 4} and r["n"]["recorder_test"] == 100
    assert r["metrics"] == ["latent", "recorder_test"]
    assert set(r["time"]) >= {"encode", "latent", "recorder_test", "total", "other"}
    assert all(v > 0.95 for v in r["latent"]["per_subset"].values())


def test_names_comma_lists_and_errors(recorder):
    model, test = _Model(), _Tuples(20, 2)
    assert evaluate(model, None, test, _INFO, metrics="recorder_test", progress=False)["metrics"] == ["recorder_test"]
    with pytest.raises(ValueError, match="unknown metric 'nope'; registered metrics: latent, coherence, loglik"):
        evaluate(model, None, test, _INFO, metrics="recorder_test,nope", progress=False)
    with pytest.raises(ValueError, match="coherence needs `classifiers`"):
        evaluate(model, None, test, _INFO, metrics=["coherence"], progress=False)
    with pytest.raises(ValueError, match="more than once"):
        evaluate(model, None, test, _INFO, metrics=["recorder_test", recorder()], progress=False)


def test_from_config_and_get_metric():
    cfg = SimpleNamespace(loglik_samples=7, loglik_max_test=50, fid_samples=100)
    ll = METRICS["loglik"].from_config(cfg)
    assert isinstance(ll, LogLikelihood) and (ll.loglik_samples, ll.loglik_max_test) == (7, 50)
    assert get_metric("latent", num_latent_train=10).num_latent_train == 10
    assert get_metric(ll) is ll


def test_eval_context_subsets():
    ctx = EvalContext(_Model(), None, [], _INFO)
    assert ctx.names == ["m0", "m1", "m2", "m0,m1", "m0,m2", "m1,m2", "m0,m1,m2"] and ctx.sizes["m0,m2"] == 2
