"""The GPU paths of the trainer, proven on the CPU (issue 21): no host sync per step, compiled = eager, bf16 close
to float32 with the fusion and KLs in float32, one batch shape per step with drop_last, and the GPU check's
--smoke run.

Every test runs the real trainer (`mopoe.train.train`) or the real model on tiny MNIST-SVHN-Text-format data
(random uint8 images and text of the real shapes, the real nets at latent 8, batch 8), so the code paths are the
ones a GPU run takes. Limits and tolerances are module constants, each with its reason.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from mopoe.data import ALPHABET, DatasetInfo, MultimodalDataset  # noqa: E402
from mopoe.learner import Callback  # noqa: E402
from mopoe.train import incomplete_train_set, resolve_config, train  # noqa: E402
from sync_count import SyncCounter, SyncWindows  # noqa: E402

OBJECTIVES = ("mopoe", "mvae", "mmvae", "subset_elbos")

# Host reads allowed per training step in forward + backward (zero_grad, the model's loss, backward): none, on every
# objective, with and without `observed` masks. The first step is not counted: caches filled once per run (the
# objective's subset masks moved to the device) are not per-step work.
SYNC_LIMIT_PER_STEP = 0
# Host reads allowed in the loop's callbacks (before_batch, after_backward, after_batch hooks): one read of a device
# value per `sync_every` steps (the NaN flag), whatever the number of steps.
CALLBACK_READS_PER_SYNC_EVERY = 1
# Graph breaks allowed in torch._dynamo.explain of the model's loss (the training configuration: check_inputs off,
# as the trainer sets it after validating the dataset once). The aim of the issue: none.
MAX_GRAPH_BREAKS = 0
# Compiled vs eager (backend aot_eager, the trainer's compile path): the same aten ops in the same order on the same
# random streams, so the losses agree to float32 rounding of a sum of ~10^4 terms of size ~1 (relative 1e-5); after
# a few Adam steps differences in summation order may grow a little: relative 1e-4.
COMPILED_RTOL = 1e-4
# bf16 autocast vs float32: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %); the losses are sums of
# ~10^4 per-pixel terms whose rounding errors mostly cancel: measured 0.008-0.15 % per step (mopoe, subset_elbos, with
# masks, 4 steps). 1 % bounds that with room for the Adam steps over which the weights drift apart, and still fails on
# a systematic error of a few bf16 roundings (e.g. a loss reduced in bf16).
BF16_RTOL = 1e-2
# The fusion and the KLs under autocast: computed in float32 from float32 experts, so equal to the float32 values
# to float32 rounding.
FUSION_RTOL = 1e-5

SHAPES = {"mnist": (1, 28, 28), "svhn": (3, 32, 32), "text": (8, len(ALPHABET))}
INFO = DatasetInfo("mnist_svhn_text", ["mnist", "svhn", "text"], SHAPES,
                   {"mnist": "laplace", "svhn": "laplace", "text": "categorical"},
                   {"mnist": 784, "svhn": 3072, "text": 8},
                   10, False, [str(i) for i in range(10)], {"mnist": True, "svhn": True, "text": True}, ALPHABET,
                   note="random tuples of MNIST-SVHN-Text's format (tests/test_gpu_paths.py)")


def tiny_dataset(n: int, seed: int) -> MultimodalDataset:
    "n random tuples in MNIST-SVHN-Text's storage format (uint8 images, text as alphabet indices)."
    g = torch.Generator().manual_seed(seed)
    data = {"mnist": torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
            "svhn": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "text": torch.randint(0, len(ALPHABET), (n, 8), generator=g, dtype=torch.uint8)}
    return MultimodalDataset(data, torch.randint(0, 10, (n,), generator=g),
                             {"mnist": "image", "svhn": "image", "text": "text"})


def tiny_config(tmp_path, **options):
    "A resolved config of the real MNIST-SVHN-Text nets at latent 8, batch 8, on the CPU."
    opts = dict(dataset="mnist_svhn_text", latent_dim=8, batch_size=8, epochs=1, device="cpu", loggers="", seed=0,
                out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"))
    return resolve_config(**{**opts, **options})


def tiny_run(cfg, n_train: int = 40, callbacks=(), progress: bool = False):
    "Train `cfg` on `n_train` random tuples (with the config's missing modalities); returns train's result."
    data = (incomplete_train_set(tiny_dataset(n_train, 0), INFO, cfg), tiny_dataset(8, 1), INFO)
    return train(cfg, callbacks=list(callbacks), data=data, progress=progress)


class LossTrace(Callback):
    "Records every step's loss (a detached copy) and batch shapes."
    order = 100
    def __init__(self): self.losses, self.shapes, self.rows = [], [], 0
    def after_batch(self, learn):
        x, obs = learn.batch
        self.losses.append(learn.loss.detach().float().clone())
        self.shapes.append({m: tuple(t.shape) for m, t in x.items()}
                           | ({"observed": tuple(obs.shape)} if obs is not None else {}))
        self.rows += next(iter(x.values())).shape[0]


# ---------------------------------------------------------------------------------------------- the sync count
def _sync_failure(counter, phase, limit, steps) -> str:
    return (f"{counter.count(phase)} host reads of device values in phase {phase!r} over {steps} counted steps "
            f"(limit {limit}); op and call site:\n{counter.report(phase)}")


def test_sync_counter_sees_what_syncs():
    "The counter's own check: every kind of host read is seen once, device-only work not at all, phases apart."
    t = torch.arange(6.0)
    with SyncCounter(active=False) as c:
        c.phase("reads")
        t.sum().item(); bool(t[1] > 0); float(t[2]); int(t.sum())
        if t[3] > 1: pass
        t.nonzero(); t[t > 2]; torch.masked_select(t, t > 1); t.tolist(); t.cpu(); t.to("cpu"); t.numpy()
        c.phase("device")
        u = (t * 2).exp().cumsum(0); torch.where(t > 2, t, u); u.to(t.device); (t > 0).all(); t.any()
        c.off()
        t[0].item()
    kinds = [r.split(" ")[0] for p, r, _ in c.events if p == "reads"]
    assert kinds.count("_local_scalar_dense") == 5 and kinds.count("nonzero") == 1
    assert {"index", "masked_select", "Tensor.tolist", "Tensor.cpu", "Tensor.to", "Tensor.numpy"} <= set(kinds)
    assert c.count("reads") == 12 and c.count("device") == 0 and c.count() == 12, c.report()
    assert all(site.split(":")[0].endswith("test_gpu_paths.py") for _, _, site in c.events), c.report()


@pytest.mark.parametrize("observed", [False, True], ids=["complete", "observed_masks"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_no_host_sync_per_step(tmp_path, objective, observed):
    "N training steps: no host read in forward + backward; at most one per sync_every steps in the callbacks."
    sync_every, steps = 2, 5                                  # 40 tuples / batch 8; the first step is not counted
    cfg = tiny_config(tmp_path, objective=objective, sync_every=sync_every, missing_rate=0.3 if observed else 0.0)
    counter = SyncCounter(active=False)
    win = SyncWindows(counter)
    with counter: tiny_run(cfg, callbacks=win.callbacks)
    n = win.counted_steps
    assert n == steps - 1
    assert counter.count("step") <= SYNC_LIMIT_PER_STEP * n, _sync_failure(counter, "step", SYNC_LIMIT_PER_STEP * n, n)
    # the NaN check reads its flag after global steps 2 and 4 (counted steps 2..5): exactly these two, no more
    limit = CALLBACK_READS_PER_SYNC_EVERY * math.ceil(n / sync_every)
    assert 1 <= counter.count("callbacks") <= limit, _sync_failure(counter, "callbacks", limit, n)


def test_callback_reads_with_every_reader(tmp_path):
    """With a visible progress bar and the tensorboard logger as well as the NaN check: the check and the bar read once
    per sync_every steps, TensorBoard once an epoch, after the checkpoint (at most three reads per sync_every steps)."""
    pytest.importorskip("torch.utils.tensorboard")
    from mopoe.learner import Progress
    sync_every = 2
    cfg = tiny_config(tmp_path, sync_every=sync_every, loggers="tensorboard")
    counter = SyncCounter(active=False)
    win = SyncWindows(counter)
    with counter: tiny_run(cfg, n_train=72, callbacks=win.callbacks + [Progress(sync_every, enabled=True)])
    n = win.counted_steps
    limit = 3 * CALLBACK_READS_PER_SYNC_EVERY * math.ceil(n / sync_every)
    assert counter.count("callbacks") <= limit, _sync_failure(counter, "callbacks", limit, n)
    readers = {site.split(" in ")[-1] for p, _, site in counter.events if p == "callbacks"}
    assert {"_check", "after_batch"} <= readers, counter.report("callbacks")                 # NaN check, progress bar
    assert "_flush" not in readers, counter.report("callbacks")                # TensorBoard reads no step mid-epoch


# ---------------------------------------------------------------------------------------------- compiled vs eager
def _aot_eager_compile(monkeypatch):
    "Make the trainer's torch.compile use backend aot_eager (CPU inductor compiles the conv nets for minutes)."
    original = torch.compile
    def compile_aot_eager(model=None, *, mode=None, **kw):
        return original(model, backend="aot_eager", **kw)
    monkeypatch.setattr(torch, "compile", compile_aot_eager)


@pytest.mark.parametrize("objective", ["mopoe", "mvae"])
def test_compiled_training_matches_eager(tmp_path, monkeypatch, objective):
    """The trainer's compile path (compile=default, drop_last automatic, β as a device tensor) with backend
    aot_eager: the losses of the seeded steps equal eager's within COMPILED_RTOL (observed masks included)."""
    runs = {}
    for name, mode in (("eager", "off"), ("compiled", "default")):
        if mode != "off": _aot_eager_compile(monkeypatch)
        trace = LossTrace()
        cfg = tiny_config(tmp_path / name, objective=objective, compile=mode, drop_last=True, missing_rate=0.3,
                          beta_warmup=3)
        out = tiny_run(cfg, n_train=36, callbacks=[trace])
        assert out["learner"].drop_last
        runs[name] = torch.stack(trace.losses)
    assert len(runs["eager"]) == 4
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=COMPILED_RTOL, atol=0)


def _tiny_mlp_model(objective: str):
    "MultimodalVAE of small MLP nets over the MNIST-SVHN-Text shapes (fast to trace), latent 8."
    from mopoe.model import MultimodalVAE, default_rec_weights
    from mopoe.nets import make_networks
    torch.manual_seed(0)
    enc, dec = make_networks(INFO, 8, 0, arch="mlp", hidden=(32,))
    return MultimodalVAE(enc, dec, INFO.likelihoods, 8, 0, objective=objective,
                         rec_weights=default_rec_weights(INFO.data_dims), shapes=INFO.shapes)


def _tiny_batch(b: int = 8, seed: int = 0):
    "A float batch (as the trainer gives the model) and an observed mask with one modality at least per tuple."
    x, _ = tiny_dataset(b, seed)[torch.arange(b)]
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(b, 3, generator=g) > 0.3
    obs[:, 0] |= ~obs.any(1)
    return x, obs


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loglik_reads_nothing_on_the_host(objective):
    "The evaluation's dominant cost, log p(X) under every proposal at once, reads no device value (after a first call)."
    model = _tiny_mlp_model(objective).eval()
    model.check_inputs = False                         # as evaluate's data: validated once when the dataset is built
    x, _ = _tiny_batch()
    ex = model.experts(x)
    model.log_likelihoods(x, num_samples=3, experts=ex, training_mixture=True)        # fills the per-model mask caches
    with SyncCounter(active=False) as c:
        c.phase("loglik")
        ll = model.log_likelihoods(x, num_samples=3, experts=ex, training_mixture=True)
        c.off()
    assert ll.shape == (2 ** 3, 8) and torch.isfinite(ll).all()
    assert c.count("loglik") == 0, _sync_failure(c, "loglik", 0, 1)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_graph_breaks(objective):
    """torch._dynamo.explain of the model's loss (observed masks: the superset of the paths) as the trainer calls it
    (check_inputs off, β a 0-dim tensor): at most MAX_GRAPH_BREAKS breaks; the reasons are printed."""
    torch._dynamo.reset()
    model = _tiny_mlp_model(objective)
    model.check_inputs = False
    x, obs = _tiny_batch()
    model.loss(x, beta=torch.tensor(2.5), observed=obs)     # the first call builds the model's mask caches (read once)
    ex = torch._dynamo.explain(model.loss)(x, beta=torch.tensor(2.5), observed=obs)
    reasons = []
    for r in ex.break_reasons:
        fr = r.user_stack[-1] if r.user_stack else None
        file = Path(fr.filename).relative_to(ROOT) if fr and fr.filename.startswith(str(ROOT)) else fr and fr.filename
        where = f"{file}:{fr.lineno if fr else ''}"
        reasons.append(f"{r.reason.splitlines()[0][:120]} @ {where}")
    print(f"{objective}: {ex.graph_count} graphs, {ex.graph_break_count} graph breaks", *reasons, sep="\n  ")
    assert ex.graph_break_count <= MAX_GRAPH_BREAKS, (f"{objective}: {ex.graph_break_count} graph breaks:\n  "
                                                      + "\n  ".join(reasons))


# ---------------------------------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("objective", ["mopoe", "subset_elbos"])
def test_bf16_losses_close_to_float32(tmp_path, objective):
    "amp=True (CPU bf16 autocast) through the trainer: every step's loss within BF16_RTOL of float32's."
    losses = {}
    for amp in (False, True):
        trace = LossTrace()
        tiny_run(tiny_config(tmp_path / str(amp), objective=objective, amp=amp, missing_rate=0.3), n_train=32,
                 callbacks=[trace])
        losses[amp] = torch.stack(trace.losses)
    assert losses[True].dtype == torch.float32 and len(losses[True]) == 4
    rel = ((losses[True] - losses[False]).abs() / losses[False].abs()).tolist()
    print(f"{objective}: bf16 vs float32 relative loss difference per step: {[f'{r:.2e}' for r in rel]}")
    assert max(rel) <= BF16_RTOL, rel
    assert losses[True][0] != losses[False][0]                 # autocast did act on the networks


def test_fusion_and_kls_stay_float32_under_autocast():
    """Under CPU bf16 autocast the experts the model returns, the products of experts, the subset-average KLs and
    the Gaussian KL are float32 and equal to their float32 values."""
    from mopoe import experts as E
    model = _tiny_mlp_model("mopoe")
    x, obs = _tiny_batch()
    mask = E.subset_mask(3)
    prior = E.prior_flags(mask)
    def fused(mu, lv):
        q = E.MixtureOfProducts(mu, lv, mask)
        ids = torch.arange(8) % 7
        return {"poe": E.poe(mu, lv, mask, prior), "poe_rows": E.poe_rows(mu, lv, obs, obs.all(1)),
                "rows": q.rows(ids), "mean_subset_kl": E.mean_subset_kl(mu, lv, mask, prior),
                "mean_subset_kl_allowed": E.mean_subset_kl(mu, lv, mask, prior, allowed=E.allowed_subsets(mask, obs)),
                "gaussian_kl": E.gaussian_kl(*q.rows(ids)), "log_prob": q.log_prob(mu[0])}
    with torch.no_grad():
        mu32, lv32, _, _ = model.experts(x)
        ref = fused(mu32, lv32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mu, lv, _, _ = model.experts(x)
            got = fused(mu, lv)
            loss, logs = model.loss(x, beta=2.5, observed=obs)
            net_out = model.decoders["svhn"](mu[1])
    assert net_out.dtype == torch.bfloat16                    # autocast is on for the networks
    assert mu.dtype == lv.dtype == torch.float32
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    for k, v in got.items():
        for a in v if isinstance(v, tuple) else (v,):
            assert a.dtype == torch.float32, k
    # the fusion itself runs in float32: fed the float32 experts under autocast, the same values as without it
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        again = fused(mu32, lv32)
    for k in ref:
        for a, b in zip(again[k] if isinstance(again[k], tuple) else (again[k],),
                        ref[k] if isinstance(ref[k], tuple) else (ref[k],), strict=True):
            torch.testing.assert_close(a, b, rtol=FUSION_RTOL, atol=1e-6, msg=lambda m: f"{k}: {m}")  # noqa: B023


# ---------------------------------------------------------------------------------------------- static shapes
@pytest.mark.parametrize("missing_rate", [0.0, 0.3])
def test_drop_last_gives_one_shape(tmp_path, missing_rate):
    "drop_last: every step's batch has one shape; an epoch sees len - len % batch tuples (two epochs)."
    n, b = 43, 8
    trace = LossTrace()
    out = tiny_run(tiny_config(tmp_path, drop_last=True, epochs=2, missing_rate=missing_rate), n_train=n,
                   callbacks=[trace])
    assert len(trace.shapes) == 2 * (n // b), trace.shapes
    assert len({tuple(sorted(s.items())) for s in trace.shapes}) == 1, trace.shapes
    assert trace.rows == 2 * (n - n % b)
    assert [h["step"] for h in out["history"]] == [n // b, 2 * (n // b)]
    # without drop_last (the CPU default) the last batch is the remainder
    trace2 = LossTrace()
    tiny_run(tiny_config(tmp_path / "keep", missing_rate=missing_rate), n_train=n, callbacks=[trace2])
    assert trace2.rows == n and trace2.shapes[-1]["mnist"][0] == n % b


# ---------------------------------------------------------------------------------------------- the GPU check
def test_gpu_check_smoke(tmp_path):
    "python benchmarks/gpu_check.py --smoke: the same stages on the CPU in seconds; its JSON has every stage."
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                        "--data_dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"environment", "settings", "step_times", "training", "evaluation_small", "evaluation_full", "sync_count",
            "errors", "wall_seconds", "table"} <= set(res)
    assert res["settings"]["smoke"] and res["environment"]["device"] == "cpu"
    for ds in ("polymnist", "mnist_svhn_text", "celeba"):
        st = res["step_times"][ds]
        for variant in ("eager_fp32", "eager_bf16", "compiled_bf16"):
            v = st[variant]
            if variant == "compiled_bf16" and ds != "mnist_svhn_text":            # the smoke run compiles once
                assert "skipped" in v; continue
            assert "error" not in v, v
            assert v["ms_per_step"] > 0 and v["steps_timed"] > 0
            assert (v["projected_paper_schedule_s"] or 0) > 0 or st["paper_schedule"]["train_tuples"] is None
        assert st["paper_schedule"]["epochs"] > 0 and (st["paper_schedule"]["steps_per_epoch"] or 1) > 0
    tr = res["training"]
    assert "error" not in tr and tr["steps"] > 0 and tr["seconds"] > 0
    ev = res["evaluation_small"]
    assert "error" not in ev and 0 <= ev["coherence"] <= 1 and ev["chance"] == 0.1 and isinstance(ev["learned"], bool)
    full = res["evaluation_full"]
    assert "error" not in full and full["test_tuples"] > 0 and full["seconds"] > 0 and math.isfinite(full["loglik_X"])
    assert res["sync_count"]["steps_counted"] > 0 and res["sync_count"]["reads_per_step"] >= 0
    assert "| dataset |" in res["table"] and res["errors"] == {}
