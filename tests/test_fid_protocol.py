"""FID's two protocols (issue 30, item 3): `png` is exactly a real PNG round trip, the protocols differ by quantisation
alone, results record the protocol next to n and the weights' SHA-256, the faster extractor keeps the features, and the
FID benchmark's --quick mode runs. Real PNG files and the real network only on a handful of images."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import mopoe.fid as fid
from mopoe.config import ConfigError, config_key, option_choices, resolve_config
from mopoe.fid import FID, FID_PROTOCOLS, FIDInception, png_quantise, prepare_images
from mopoe.metric import evaluate

pytest.importorskip("pytorch_fid", reason="the fid extra is not installed")
ROOT = Path(__file__).resolve().parents[1]


class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs): raise AssertionError("FID code opened a socket")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket, "socket", _NoNetwork)


def _images(seed=0):
    "Grey and colour images with values off the 8-bit grid, some outside [0, 1], some exactly between two levels."
    g = torch.Generator().manual_seed(seed)
    grey, rgb = torch.rand(3, 1, 28, 28, generator=g) * 1.2 - 0.1, torch.rand(3, 3, 32, 32, generator=g)
    grey[0, 0, 0, :16] = (torch.arange(16).float() + 0.5) / 255
    return grey, rgb


def test_png_equals_writing_and_reading_real_png_files(tmp_path):
    """torchvision's save_image (the authors' writer, through PIL), read back by PIL as their imread and by
    pytorch-fid's reader."""
    from PIL import Image
    from pytorch_fid.fid_score import ImagePathDataset
    from torchvision.transforms import ToTensor
    from torchvision.utils import save_image
    for kind, xs in zip(("grey", "rgb"), _images(), strict=True):
        files = []
        for i, x in enumerate(xs):
            files.append(tmp_path / f"{kind}_{i}.png")
            save_image(x, files[-1])
        via_pil = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255).permute(2, 0, 1)
                               for f in files])
        via_pytorch_fid = torch.stack(list(ImagePathDataset(files, transforms=ToTensor())))
        assert torch.equal(via_pil, prepare_images(png_quantise(xs)))              # bit for bit, grey repeated to RGB
        assert torch.equal(via_pytorch_fid, via_pil)
        assert not torch.equal(prepare_images(xs), via_pil)                   # the tensor protocol skips the rounding


def test_png_quantise_is_a_projection_onto_the_8_bit_levels():
    x = _images()[1]
    q = png_quantise(x)
    assert torch.equal(png_quantise(q), q) and (q - x).abs().max() <= 0.5 / 255 + 1e-7
    levels = torch.arange(256).float() / 255
    # k/255 pass unchanged
    assert torch.equal(png_quantise(levels), torch.from_numpy(np.arange(256, dtype=np.float32) / 255))
    assert torch.equal(png_quantise(torch.tensor([-3.0, 0.4 / 255, 0.5 / 255, 254.5 / 255, 7.0])),
                       torch.tensor([0, 0, 1, 255, 255]) / 255.0)
    assert png_quantise(x.double()).dtype == torch.float32


# --- the metric with a cheap stand-in extractor: the protocols differ by quantisation alone ---

class _Pool(nn.Module):
    def forward(self, x): return nn.functional.adaptive_avg_pool2d(prepare_images(x), 4).flatten(1)


class _Tuples(torch.utils.data.Dataset):
    def __init__(self, n, seed=0, eight_bit=False):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(4, (n,), generator=g)
        base = (self.y.float() / 4)[:, None, None, None]
        self.x = {"a": (base + 0.1 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1),
                  "b": (base + 0.1 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1)}
        if eight_bit: self.x = {m: png_quantise(t) for m, t in self.x.items()}
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {m: t[i] for m, t in self.x.items()}, self.y[i]


_INFO = SimpleNamespace(name="imgtoy", modalities=["a", "b"], shapes={"a": (1, 8, 8), "b": (3, 8, 8)},
                        likelihoods={"a": "laplace", "b": "laplace"}, multilabel=False, label_names=list("0123"))


class _Blur(nn.Module):
    """A stand-in model: conditional generations are the batch shifted and dimmed (off the 8-bit grid), prior samples
    noise."""
    modalities = ["a", "b"]
    def __init__(self, eight_bit=False):
        super().__init__(); self.w, self.eight_bit = nn.Parameter(torch.zeros(1)), eight_bit
    def _out(self, d): return {m: png_quantise(t) for m, t in d.items()} if self.eight_bit else d
    def experts(self, x):
        mu = torch.zeros(2, len(x["a"]), 2)
        return mu, mu.clone(), torch.ones(2, dtype=torch.bool), {}
    def cond_generate(self, x, num_samples=None, given=None, experts=None):
        return self._out({m: (0.9 * t.roll(1, -1) + 0.037).clamp(0, 1) for m, t in x.items()})
    def generate(self, n): return self._out({"a": torch.rand(n, 1, 8, 8), "b": torch.rand(n, 3, 8, 8)})


def _fid(model, data, protocol, tmp_path, n=24):
    "The evaluation's result and {(source or 'prior', target): FID}."
    r = evaluate(model, None, data, _INFO,
                 metrics=[FID(n, data_dir=tmp_path, extractor=_Pool(), fid_protocol=protocol)], batch_size=8,
                 progress=False)
    f = r["fid"]
    values = {("prior", t): v["fid"] for t, v in f["unconditional"].items()}
    return r, values | {(s, t): v["fid"] for s, d in f["conditional"].items() for t, v in d.items()}


def test_protocols_differ_on_quantisation_alone(tmp_path):
    r_t, tensor = _fid(_Blur(), _Tuples(30), "tensor", tmp_path / "t")
    r_p, png = _fid(_Blur(), _Tuples(30), "png", tmp_path / "p")
    assert set(tensor) == set(png) and len(tensor) == 2 + 2 and all(np.isfinite(list(tensor.values())))
    assert all(tensor[k] != png[k] for k in tensor), (tensor, png)              # off-grid images: the protocols differ
    # ... by quantisation alone.
    # The real images: png feeds exactly the tensor protocol's images quantised beforehand
    r_q, _ = _fid(_Blur(), _Tuples(30, eight_bit=True), "tensor", tmp_path / "q")
    assert r_p["fid"]["reference"] == r_q["fid"]["reference"] != r_t["fid"]["reference"]  # SHA-256 of the images fed
    # the generated images: on 8-bit data (the models see the same inputs),
    # png = tensor of the generations quantised
    _, png8 = _fid(_Blur(), _Tuples(30, eight_bit=True), "png", tmp_path / "r")
    _, pre = _fid(_Blur(eight_bit=True), _Tuples(30, eight_bit=True), "tensor", tmp_path / "s")
    _, tensor8 = _fid(_Blur(), _Tuples(30, eight_bit=True), "tensor", tmp_path / "u")
    assert png8 == pre and all(png8[k] != tensor8[k] for k in png8)
    # and on images already on the 8-bit grid everywhere the two protocols are one and the same
    _, both = _fid(_Blur(eight_bit=True), _Tuples(30, eight_bit=True), "png", tmp_path / "v")
    assert both == pre


def test_results_record_the_protocol_next_to_n_and_the_weights(tmp_path):
    r, _ = _fid(_Blur(), _Tuples(30), "png", tmp_path)
    f = r["fid"]
    assert list(f)[:3] == ["n", "protocol", "note"] and f["protocol"] == "png" and f["n"] == 24
    assert "Protocol png" in f["note"] and "biased upward at small n" in f["note"]
    assert "weights" in f and "sha256" in f["weights"]
    assert r["settings"]["fid_protocol"] == "png" and r["settings"]["fid_samples"] == 24
    json.dumps(r, allow_nan=False)


def test_reference_cache_is_keyed_by_the_images_each_protocol_feeds(tmp_path):
    # a digest: its features are cached
    class Recorded(_Pool): provenance = {"source": "4x4 pooling", "sha256": "p" * 64}
    def ref_files(data, protocol):
        fid_metric = FID(10, data_dir=tmp_path, extractor=Recorded(), fid_protocol=protocol, precision_recall=False)
        evaluate(_Blur(), None, data, _INFO, metrics=[fid_metric], batch_size=10, progress=False)
        return sorted(p.name for p in (tmp_path / "fid").glob("imgtoy_*"))
    ref_files(_Tuples(12, seed=3), "tensor")
    assert len(ref_files(_Tuples(12, seed=3), "png")) == 4                  # off-grid real images: a cache per protocol
    for f in (tmp_path / "fid").glob("imgtoy_*"): f.unlink()
    ref_files(_Tuples(12, seed=3, eight_bit=True), "tensor")
    # 8-bit real images: the same features, shared
    assert len(ref_files(_Tuples(12, seed=3, eight_bit=True), "png")) == 2


def test_option_declared_checked_and_keyed():
    assert option_choices("fid_protocol") == FID_PROTOCOLS == ("tensor", "png")
    with pytest.raises(ConfigError, match="unknown fid_protocol 'jpeg'; choose one of: tensor, png"):
        resolve_config(fid_protocol="jpeg")
    with pytest.raises(ValueError, match="fid_protocol must be one of tensor, png"):
        FID(10, fid_protocol="PNG")
    base = resolve_config(metrics="latent,fid")
    assert base.fid_protocol == "tensor"
    assert config_key(base) == config_key(resolve_config(metrics="latent,fid", fid_protocol="tensor"))
    assert config_key(resolve_config(metrics="latent,fid", fid_protocol="png")) != config_key(base)  # another number
    assert config_key(resolve_config(metrics="latent", fid_protocol="png")) == config_key(
        resolve_config(metrics="latent"))
    old = SimpleNamespace(fid_samples=50, fid_weights=None, data_dir="data")                      # a config from before
    assert FID.from_config(old).fid_protocol == "tensor"
    assert FID.from_config(resolve_config(metrics="fid", fid_protocol="png")).fid_protocol == "png"


def test_committed_fids_used_the_tensor_protocol():
    ("Every committed FID fed tensors: those computed before the png protocol existed say so in their note, the "
     "later ones record protocol 'tensor' and its note.")
    from mopoe.fid import PROTOCOL_NOTES
    for f in sorted((ROOT / "results").glob("**/results*.json")):
        r = json.loads(f.read_text())
        fr = (r.get("metrics") or {}).get("fid")
        if not fr: continue
        if "protocol" in fr: assert fr["protocol"] == "tensor" and PROTOCOL_NOTES["tensor"] in fr["note"], f
        else: assert "fed as tensors" in fr["note"], f


# --- the real network, a few images ---

@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("fid")
    return FIDInception(cache_dir=cache), FIDInception(cache_dir=cache, fast=False)


def test_real_network_png_files_and_the_faster_extractor(nets, tmp_path):
    from PIL import Image
    from torchvision.utils import save_image
    fast, exact = nets
    x = _images(1)[1]
    for i, img in enumerate(x): save_image(img, tmp_path / f"{i}.png")
    files = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / f"{i}.png"), dtype=np.float32) / 255)
                         .permute(2, 0, 1) for i in range(len(x))])
    f_png, f_files, f_tensor = fast(png_quantise(x)), fast(files), fast(x)
    assert torch.equal(f_png, f_files)                                          # the same input, the same features
    assert (f_png - f_tensor).abs().max() > 1e-4                               # quantisation moves the features
    assert torch.allclose(f_tensor, exact(x), atol=1e-4) and not f_tensor.requires_grad
    assert fast.fast and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert all(not p.requires_grad for p in fast.parameters())
    a, b = fid.feature_stats(f_tensor.double()), fid.feature_stats(exact(x).double())
    assert abs(fid.frechet_distance(*a, *b)) < 1e-3                                # the same statistics to rounding


@pytest.mark.integration
def test_bench_fid_quick(tmp_path):
    out = tmp_path / "fid.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fid.py"), "--quick", "--json", str(out),
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"machine", "settings", "results", "flops_per_image", "loadavg", "wall_seconds"} <= set(res)
    assert 11.3e9 < res["flops_per_image"] < 11.5e9                             # 5.71 G multiply-adds
    names = [r["setting"] for r in res["results"]]
    assert names[:2] == ["baseline", "kept"] and names[-1] == "shipped" and "kept_threads2" in names
    for r in res["results"]:
        assert r["seconds_per_1000_images"] > 0 and r["peak_gflops_per_s"] > 0 and 0 < r["ratio_to_peak"]
        assert r["max_abs_feature_diff_vs_baseline"] < 1e-3
