"""The GPU check of issue 21: one command, run as is on any machine with a CUDA GPU, that measures what the issue asks.

    python benchmarks/gpu_check.py                    # on a GPU: <= 8 minutes on one H100 (budget 480 s)
    python benchmarks/gpu_check.py --smoke            # the same code paths on the CPU in about a minute (CI)

Stages, in this order (each one wrapped: a failure is recorded under its name in the JSON and the next stage runs;
a stage that would not fit the remaining `--budget` is recorded as skipped):

1. environment: device, GPU memory, torch/CUDA/cuDNN versions, the repository's commit;
2. step times of PolyMNIST's `paper` preset through `mopoe.train.train` (data on the device, drop_last, one shape a
   step): eager float32, eager bf16 (amp), compiled bf16 (`compile`, default mode); ms a step timed over
   `--steps` steps after `--warmup` steps (CUDA synchronize at both ends, CUDA events), the peak memory
   (`torch.cuda.max_memory_allocated`) and the projected time of the paper's schedule (epochs x steps an epoch x ms);
   random tuples of the dataset's storage format (the step time does not depend on the pixel values);
3. host syncs per training step on the device (benchmarks/sync_count.py over eager steps 2..N);
4. a `--train_seconds` (120 s) PolyMNIST training at the `paper` preset on the offline data (the fastest variant
   that worked in stage 2), stopped by a callback (`learn.stop = True`);
5. a small evaluation of that model (latent classification and coherence on `--small_eval` test tuples) that must
   show learning: the mean coherence of the unimodal subsets (targets outside the subset) above chance (0.1) by
   three standard errors;
6. step times of MNIST-SVHN-Text's and CelebA's `paper` presets (as stage 2);
7. the full evaluation (every subset; latent, coherence and 15-sample log-likelihoods) of `--full_eval` (10,000)
   test tuples, when a probe on 500 tuples projects that it fits the remaining budget (else the projection only).

Writes a JSON file (`--out`, default benchmarks/results/gpu_check.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from sync_count import SyncCounter, SyncWindows  # noqa: E402

DATASETS = ("polymnist", "mnist_svhn_text", "celeba")
VARIANTS = {"eager_fp32": dict(amp=False, compile="off"), "eager_bf16": dict(amp=True, compile="off"),
            "compiled_bf16": dict(amp=True, compile="default")}
# training tuples of the paper's datasets (for the projected schedule): PolyMNIST 60,000 (Appendix D); CelebA's
# official training split 162,770; MNIST-SVHN-Text's depends on the pairing of the real files (not stated): unknown
PAPER_TRAIN_TUPLES = {"polymnist": 60_000, "mnist_svhn_text": None, "celeba": 162_770}
CHANCE = 0.1                        # coherence of a random guess among PolyMNIST's 10 digits


# ------------------------------------------------------------------------------------------------ helpers
class Budget:
    "Seconds left of the run's budget; `fits(s)`: whether a stage expected to take s seconds still fits."
    def __init__(self, seconds: float): self.t0, self.seconds = time.perf_counter(), seconds
    def used(self) -> float: return time.perf_counter() - self.t0
    def left(self) -> float: return self.seconds - self.used()
    def fits(self, s: float) -> bool: return self.left() >= s


def log(msg: str):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage(results: dict, key: str, fn, *args, **kw):
    "Run one stage; its result (a dict) or {'error': ...} goes to results[key]; the error also to results['errors']."
    log(f"{key} ...")
    t = time.perf_counter()
    try:
        out = fn(*args, **kw)
    except Exception as e:                                     # recorded, and the next stage runs
        out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
        results["errors"][key] = out["error"] + "\n" + traceback.format_exc(limit=6)[-1500:]
        log(f"{key} FAILED: {out['error']}")
    out = out if isinstance(out, dict) else {"value": out}
    out.setdefault("stage_seconds", round(time.perf_counter() - t, 2))
    results[key] = out
    log(f"{key} done in {out['stage_seconds']:.1f} s")
    return out


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def environment(device) -> dict:
    env = {"device": device.type, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   gpu_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception: env["commit"] = None
    return env


def synthetic_data(dataset: str, n: int, seed: int = 0):
    "(train, test, info): n random tuples in the dataset's storage format and a DatasetInfo like the builder's."
    from mopoe.data import ALPHABET, DatasetInfo, MultimodalDataset
    if dataset == "polymnist":
        mods = [f"m{i}" for i in range(5)]
        shapes, liks, kinds = {m: (3, 28, 28) for m in mods}, {m: "laplace" for m in mods}, {m: "image" for m in mods}
        classes, multilabel, labels = 10, False, [str(i) for i in range(10)]
    elif dataset == "mnist_svhn_text":
        mods = ["mnist", "svhn", "text"]
        shapes = {"mnist": (1, 28, 28), "svhn": (3, 32, 32), "text": (8, len(ALPHABET))}
        liks = {"mnist": "laplace", "svhn": "laplace", "text": "categorical"}
        kinds = {"mnist": "image", "svhn": "image", "text": "text"}
        classes, multilabel, labels = 10, False, [str(i) for i in range(10)]
    elif dataset == "celeba":
        mods = ["img", "text"]
        shapes, liks = {"img": (3, 64, 64), "text": (256, len(ALPHABET))}, {"img": "laplace", "text": "categorical"}
        kinds, classes, multilabel, labels = {"img": "image", "text": "text"}, 40, True, [f"a{i}" for i in range(40)]
    else: raise ValueError(f"unknown dataset {dataset!r}")
    dims = {m: (math.prod(shapes[m]) if kinds[m] == "image" else shapes[m][0]) for m in mods}
    info = DatasetInfo(dataset, mods, shapes, liks, dims, classes, multilabel, labels, {m: True for m in mods},
                       ALPHABET if "text" in kinds.values() else None,
                       note="random tuples of the storage format (gpu_check)")
    def split(k, s):
        g = torch.Generator().manual_seed(s)
        data = {m: (torch.randint(0, len(ALPHABET), (k, shapes[m][0]), generator=g, dtype=torch.uint8)
                    if kinds[m] == "text" else torch.randint(0, 256, (k, *shapes[m]), generator=g, dtype=torch.uint8))
                for m in mods}
        y = (torch.randint(0, 2, (k, classes), generator=g, dtype=torch.uint8) if multilabel else
             torch.randint(0, classes, (k,), generator=g))
        return MultimodalDataset(data, y, kinds, alphabet=ALPHABET)
    return split(n, seed), split(max(8, n // 8), seed + 1), info


def compile_backend(backend: str):
    "Make torch.compile use `backend` (inductor: unchanged; aot_eager for the CPU smoke run, as the tests do)."
    if backend == "inductor": return
    original = torch.compile
    def compile_with(model=None, *, mode=None, **kw): return original(model, backend=backend, **kw)
    torch.compile = compile_with


def paper_config(args, dataset: str, out_dir: Path, **options):
    "The `paper` preset of a dataset on this device (smoke: latent 8, batch 8)."
    from mopoe.train import resolve_config
    opts = dict(dataset=dataset, preset="paper", device=args.device, out_dir=str(out_dir), data_dir=args.data_dir,
                loggers="", seed=0, drop_last=True, data_on_device=None if args.smoke else True)
    if args.smoke: opts.update(latent_dim=8, batch_size=4)
    return resolve_config(**{**opts, **options})


def _train(cfg, data, callbacks):
    from mopoe.train import train
    try: return train(cfg, callbacks=callbacks, data=data, progress=False)
    except ValueError as e:                          # a trainer without mopoe.data.dataset_to: data stays on the host
        if cfg.data_on_device and "dataset_to" in str(e):
            log(f"data_on_device unavailable ({e}); retrying with the data on the host")
            return train(replace(cfg, data_on_device=None), callbacks=callbacks, data=data, progress=False)
        raise


# ------------------------------------------------------------------------------------------------ stage: step times
def time_steps(args, dataset: str, variant: str, tmp: Path) -> dict:
    from mopoe.learner import Callback
    device = torch.device(args.device)
    cfg = paper_config(args, dataset, tmp / f"steps_{dataset}_{variant}", **VARIANTS[variant])
    warmup, steps = args.warmup, args.steps
    n = (warmup + steps + 2) * cfg.batch_size                  # one epoch longer than the timed steps: no epoch end
    data = synthetic_data(dataset, n)
    rec = {}

    class StepTimer(Callback):
        order = 50
        def after_batch(self, learn):
            if learn.step == 1:
                sync(device); rec["to_first_step_s"] = time.perf_counter() - rec["t_start"]   # build, compile, step 1
            if learn.step == warmup:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    rec["e0"] = torch.cuda.Event(enable_timing=True); rec["e0"].record()
                rec["t0"] = time.perf_counter()
            elif learn.step == warmup + steps:
                if device.type == "cuda": rec["e1"] = torch.cuda.Event(enable_timing=True); rec["e1"].record()
                sync(device)
                rec["t1"] = time.perf_counter()
                learn.stop = True

    if device.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    rec["t_start"] = time.perf_counter()
    out = _train(cfg, data, [StepTimer()])
    if "t1" not in rec: raise RuntimeError(f"the run stopped before {warmup + steps} steps")
    wall_ms = (rec["t1"] - rec["t0"]) * 1000 / steps
    ms = rec["e0"].elapsed_time(rec["e1"]) / steps if "e1" in rec else wall_ms
    learn = out["learner"]
    tuples = PAPER_TRAIN_TUPLES[dataset]
    paper_steps = None if tuples is None else cfg.epochs * (tuples // cfg.batch_size)
    res = {"ms_per_step": round(ms, 3), "wall_ms_per_step": round(wall_ms, 3), "steps_timed": steps,
           "warmup_steps": warmup, "seconds_to_first_step": round(rec.get("to_first_step_s", float("nan")), 2),
           "batch_size": cfg.batch_size, "latent_dim": cfg.latent_dim, "amp": cfg.amp, "compile": cfg.compile,
           "compile_backend": args.compile_backend, "data_on_device": bool(getattr(learn, "data_on_device", False)),
           "drop_last": bool(getattr(learn, "drop_last", False)),
           "projected_paper_schedule_s": None if paper_steps is None else round(paper_steps * ms / 1000, 1)}
    if device.type == "cuda":
        res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return res


def step_times(args, dataset: str, tmp: Path, budget: Budget, results: dict, reserve: float) -> dict:
    from mopoe.nets import PAPER_SETUPS
    setup = PAPER_SETUPS[dataset]
    tuples = PAPER_TRAIN_TUPLES[dataset]
    out = {"paper_schedule": {"epochs": setup.epochs, "batch_size": setup.batch_size, "train_tuples": tuples,
                              "steps_per_epoch": None if tuples is None else tuples // setup.batch_size,
                              "steps": None if tuples is None else setup.epochs * (tuples // setup.batch_size)}}
    for variant in VARIANTS:
        if args.smoke and "compiled" in variant and dataset != "mnist_svhn_text":
            out[variant] = {"skipped": "smoke run: the compiled path runs once (MNIST-SVHN-Text, the quickest to "
                                       "trace)"}
            continue
        need = args.compile_reserve if "compiled" in variant else 20
        if not args.smoke and not budget.fits(need + reserve):
            out[variant] = {"skipped": f"budget: {budget.left():.0f} s left, {need + reserve:.0f} s needed"}
            log(f"  {dataset} {variant}: skipped (budget)"); continue
        t = time.perf_counter()
        try: out[variant] = time_steps(args, dataset, variant, tmp)
        except Exception as e:
            out[variant] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
            results["errors"][f"step_times/{dataset}/{variant}"] = (out[variant]["error"] + "\n"
                                                                    + traceback.format_exc(limit=6)[-1500:])
        v = out[variant]
        log(f"  {dataset} {variant}: "
            + (f"{v['ms_per_step']:.2f} ms/step" if "ms_per_step" in v else v.get("error", "?"))
            + f" ({time.perf_counter() - t:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------ stage: syncs
def sync_count(args, tmp: Path) -> dict:
    "Host reads of device values in N eager PolyMNIST steps on this device (steps 2..N counted)."
    cfg = paper_config(args, "polymnist", tmp / "sync", amp=True, sync_every=50)
    steps = 4 if args.smoke else 20
    data = synthetic_data("polymnist", (steps + 2) * cfg.batch_size)
    counter = SyncCounter(active=False)
    win = SyncWindows(counter)
    from mopoe.train import StopAfter
    with counter: _train(cfg, data, win.callbacks + [StopAfter(steps)])
    n = win.counted_steps
    sites = [{"phase": p, "op": r, "site": s, "count": c} for (p, r, s), c in
             __import__("collections").Counter(counter.events).most_common()]
    return {"steps_counted": n, "reads_forward_backward": counter.count("step"),
            "reads_callbacks": counter.count("callbacks"),
            "reads_per_step": round(counter.count("step") / max(n, 1), 3), "sync_every": cfg.sync_every, "sites": sites}


# ------------------------------------------------------------------------------------------------ stage: training
def polymnist_data(args):
    "The offline PolyMNIST tuples at the paper's 5 modalities (cached in --data_dir)."
    from mopoe.data import get_datasets
    t = time.perf_counter()
    train, test, info = get_datasets("polymnist", root=args.data_dir, num_train=args.num_train, num_test=args.num_test,
                                     source="offline", num_modalities=5, seed=0)
    return train, test, info, time.perf_counter() - t


def training(args, tmp: Path, state: dict, results: dict) -> dict:
    from mopoe.learner import Callback
    train_ds, test_ds, info, build_s = polymnist_data(args)
    state["data"] = (train_ds, test_ds, info)
    st = results.get("step_times", {}).get("polymnist", {})
    ok = [v for v in VARIANTS if "ms_per_step" in st.get(v, {})]
    variant = (args.train_variant if args.train_variant != "fastest" else
               min(ok, key=lambda v: st[v]["ms_per_step"]) if ok else "eager_bf16")
    cfg = paper_config(args, "polymnist", tmp / "train", epochs=10_000, **VARIANTS[variant])
    small_test = torch.utils.data.Subset(test_ds, range(min(len(test_ds), 256)))        # the per-epoch test loss: small

    class NoCheckpoints(Callback):
        "The check needs no checkpoints: the paper model's would be written every (short) epoch."
        order = -10**9
        def before_fit(self, learn):
            learn.callbacks = [c for c in learn.callbacks if type(c).__name__ != "Checkpointer"]

    class StopAfterSeconds(Callback):
        order = 60
        def before_fit(self, learn): self.t0 = time.perf_counter()
        def after_batch(self, learn):
            if time.perf_counter() - self.t0 >= args.train_seconds: learn.stop = True

    t = time.perf_counter()
    out = _train(cfg, (train_ds, small_test, info), [NoCheckpoints(), StopAfterSeconds()])
    seconds = time.perf_counter() - t
    learn = out["learner"]
    state["model"], state["cfg"], state["device"] = out["model"], cfg, out["device"]
    hist = out["history"]
    return {"variant": variant, "seconds": round(seconds, 1), "steps": learn.step, "epochs_completed": len(hist),
            "ms_per_step_overall": round(seconds * 1000 / max(learn.step, 1), 2), "train_tuples": len(train_ds),
            "batch_size": cfg.batch_size, "latent_dim": cfg.latent_dim, "data_build_s": round(build_s, 1),
            "data": info.data_label() if hasattr(info, "data_label") else info.name,
            "train_loss_by_epoch": _every(hist, "train_loss"), "test_loss_by_epoch": _every(hist, "test_loss")}


def _every(hist, key, n: int = 20) -> dict:
    "{epoch: value} of at most n epochs (evenly spaced, the last included)."
    keep = sorted({round(i * (len(hist) - 1) / max(n - 1, 1)) for i in range(n)}) if hist else []
    return {hist[i]["epoch"]: round(hist[i][key], 2) for i in keep if key in hist[i]}


def _classifiers(args, state):
    from mopoe.evaluate import train_classifiers
    if "classifiers" not in state:
        train_ds, test_ds, info = state["data"]
        state["classifiers"] = train_classifiers(train_ds, info, epochs=args.classifier_epochs, device=state["device"],
                                                 cache_dir=str(Path(args.data_dir) / "classifiers"), seed=0,
                                                 max_train=args.classifier_train, progress=False)
    return state["classifiers"]


def _evaluate(args, state, metrics: str, n_test: int, **kw):
    from mopoe.evaluate import evaluate
    from mopoe.train import evaluation_metrics
    train_ds, test_ds, info = state["data"]
    cfg = replace(state["cfg"], metrics=metrics)
    sync(state["device"])
    t = time.perf_counter()
    res = evaluate(state["model"], train_ds, test_ds, info,
                   _classifiers(args, state) if "coherence" in metrics else None, metrics=evaluation_metrics(cfg),
                   max_test=n_test, device=state["device"], seed=0, progress=False, **kw)
    sync(state["device"])
    return res, time.perf_counter() - t


def evaluation_small(args, state: dict) -> dict:
    if "model" not in state: raise RuntimeError("no trained model (the training stage failed)")
    t = time.perf_counter()
    clf = _classifiers(args, state)
    clf_s = time.perf_counter() - t
    res, secs = _evaluate(args, state, "latent,coherence", args.small_eval)
    n = res["n"]["test"]
    coh = res["coherence"]["by_size"]["excl_target"]["1"]       # unimodal subsets generating the other modalities
    se = math.sqrt(CHANCE * (1 - CHANCE) / n)
    lat = res["latent"]["by_size"]
    return {"test_tuples": n, "coherence": round(coh, 4), "chance": CHANCE, "threshold": round(CHANCE + 3 * se, 4),
            "learned": bool(coh > CHANCE + 3 * se), "joint_coherence": res["coherence"].get("joint"),
            "coherence_by_size_excl_target": res["coherence"]["by_size"]["excl_target"],
            "latent_accuracy_by_size": lat,
            "classifier_accuracy": res.get("classifiers") or getattr(clf, "scores", None),
            "classifier_seconds": round(clf_s, 1), "seconds": round(secs, 2)}


def evaluation_full(args, state: dict, budget: Budget) -> dict:
    if "model" not in state: raise RuntimeError("no trained model (the training stage failed)")
    _, test_ds, _ = state["data"]
    target = min(args.full_eval, len(test_ds))
    probe_n = min(args.probe_eval, target)
    full = dict(loglik_samples=args.loglik_samples)
    probe, probe_s = _evaluate(args, state, "latent,coherence,loglik", probe_n, **full)
    projected = probe_s * target / probe_n
    out = {"metrics": "latent,coherence,loglik", "loglik_samples": args.loglik_samples, "subsets": "all",
           "probe_test_tuples": probe_n, "probe_seconds": round(probe_s, 2), "projected_seconds": round(projected, 1),
           "target_test_tuples": target}
    if target > probe_n and not (args.smoke or budget.fits(projected + 10)):
        out.update(test_tuples=probe_n, seconds=None,
                   skipped=f"budget: {budget.left():.0f} s left, {projected:.0f} s projected")
        return out
    res, secs = ((probe, probe_s) if target == probe_n else
                 _evaluate(args, state, "latent,coherence,loglik", target, **full))
    out.update(test_tuples=target, seconds=round(secs, 2), time_by_metric=res.get("time"),
               loglik_X=res.get("loglik", {}).get("X"))
    return out


# ------------------------------------------------------------------------------------------------ the table
def _fmt(v, f="{:.2f}"):
    return "not measured" if v is None else f.format(v)


def table(results: dict) -> str:
    env = results["environment"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"Device: {where}; torch {env.get('torch')}, CUDA {env.get('cuda')}; commit {env.get('commit')}"
             + ("; SMOKE RUN (tiny sizes, not a measurement)" if results["settings"]["smoke"] else ""), "",
             "| dataset | variant | ms / step | peak memory (GB) | data on device | paper schedule (steps) "
             "| projected paper schedule |",
             "|---|---|---|---|---|---|---|"]
    for ds, st in results.get("step_times", {}).items():
        if not isinstance(st, dict) or "paper_schedule" not in st: continue
        steps = st["paper_schedule"]["steps"]
        for v in VARIANTS:
            r = st.get(v, {})
            why = r.get("error") or r.get("skipped")
            proj = r.get("projected_paper_schedule_s")
            ms = _fmt(r.get('ms_per_step')) if not why else 'failed' if 'error' in r else 'skipped'
            lines.append(f"| {ds} | {v} | {ms} | "
                         f"{_fmt(r.get('peak_memory_gb'), '{:.2f}') if 'peak_memory_gb' in r else '–'} | "
                         f"{('yes' if r['data_on_device'] else 'no') if 'data_on_device' in r else '–'} | "
                         f"{steps if steps else 'unknown'} | {f'{proj / 60:.1f} min' if proj else '–'} |")
    tr, ev, full, sc = (results.get(k, {}) for k in ("training", "evaluation_small", "evaluation_full", "sync_count"))
    lines += ["", "| check | result |", "|---|---|"]
    if "reads_per_step" in sc:
        lines.append(f"| host syncs per step (forward+backward) | {sc['reads_per_step']} over {sc['steps_counted']} "
                     "steps; "
                     f"callbacks {sc['reads_callbacks']} reads (sync_every {sc['sync_every']}) |")
    if "steps" in tr:
        lines.append(f"| PolyMNIST training ({tr['variant']}) | {tr['steps']} steps in {tr['seconds']} s "
                     f"({tr['ms_per_step_overall']} ms/step incl. epoch ends), {tr['epochs_completed']} epochs |")
    if "coherence" in ev:
        lines.append(f"| coherence after training (unimodal -> others, {ev['test_tuples']} tuples) | "
                     f"{ev['coherence']:.3f} (chance {ev['chance']}, threshold {ev['threshold']:.3f}): "
                     f"{'learned' if ev['learned'] else 'NOT above chance'} |")
    if "projected_seconds" in full:
        lines.append(f"| full evaluation, {full['target_test_tuples']} test tuples (all subsets, "
                     f"{full['loglik_samples']} samples) | "
                     + (f"{full['seconds']} s" if full.get("seconds") else f"projected {full['projected_seconds']} s "
                        f"(from {full['probe_test_tuples']} tuples in {full['probe_seconds']} s)") + " |")
    for k, e in results["errors"].items(): lines.append(f"| error in {k} | {e.splitlines()[0][:150]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the same stages on the CPU with tiny sizes (seconds; CI)")
    p.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"), help="the JSON file to write")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="dataset and classifier caches")
    p.add_argument("--budget", type=float, default=480,
                   help="seconds for the whole check; stages that would not fit are skipped")
    p.add_argument("--reserve", type=float, default=80,
                   help="seconds kept for the data, the small and the full evaluation (besides --train_seconds) "
                        "while timing PolyMNIST's steps")
    p.add_argument("--compile_reserve", type=float, default=120,
                   help="seconds a compiled variant may need (compilation)")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (default 25; 1 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100; 2 with --smoke)")
    p.add_argument("--train_seconds", type=float, default=None,
                   help="length of the PolyMNIST training (default 120; 4 with --smoke)")
    p.add_argument("--train_variant", default="fastest", choices=["fastest", *VARIANTS])
    p.add_argument("--num_train", type=int, default=None,
                   help="offline PolyMNIST training tuples (default 20000; 64 with --smoke)")
    p.add_argument("--num_test", type=int, default=None,
                   help="offline PolyMNIST test tuples (default 10000; 24 with --smoke)")
    p.add_argument("--classifier_epochs", type=int, default=None,
                   help="coherence classifiers' epochs (default 2; 1 with --smoke)")
    p.add_argument("--classifier_train", type=int, default=None,
                   help="their training tuples (default 20000; 64 with --smoke)")
    p.add_argument("--small_eval", type=int, default=None,
                   help="test tuples of the small evaluation (default 500; 16 with --smoke)")
    p.add_argument("--full_eval", type=int, default=None,
                   help="test tuples of the full evaluation (default 10000; 8 with --smoke)")
    p.add_argument("--probe_eval", type=int, default=None,
                   help="test tuples of its timing probe (default 500; 8 with --smoke)")
    p.add_argument("--loglik_samples", type=int, default=None, help="importance samples (default 15; 2 with --smoke)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = p.parse_args(argv)
    small = args.smoke
    defaults = dict(device="cpu" if small else "cuda", compile_backend="aot_eager" if small else "inductor",
                    warmup=1 if small else 25, steps=2 if small else 100, train_seconds=4 if small else 120,
                    num_train=64 if small else 20_000, num_test=24 if small else 10_000,
                    classifier_epochs=1 if small else 2, classifier_train=64 if small else 20_000,
                    small_eval=16 if small else 500, full_eval=8 if small else 10_000, probe_eval=8 if small else 500,
                    loglik_samples=2 if small else 15)
    for k, v in defaults.items():
        if getattr(args, k) is None: setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    budget = Budget(args.budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --smoke for the CPU smoke run (or --device cpu)",
              file=sys.stderr)
        return 2
    compile_backend(args.compile_backend)
    results = {"settings": {k: v for k, v in vars(args).items()}, "errors": {}}
    results["settings"]["paper_train_tuples"] = PAPER_TRAIN_TUPLES
    state = {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    stage(results, "environment", environment, device)
    log(f"device {results['environment'].get('gpu') or device.type}, torch {torch.__version__}; "
        f"budget {args.budget:.0f} s")
    results["step_times"] = {}
    order = [d for d in ("polymnist",) if d in args.datasets]
    for ds in order:
        results["step_times"][ds] = _stage_value(results, f"step_times/{ds}", step_times, args, ds, tmp, budget,
                                                 results, args.train_seconds + args.reserve)
    stage(results, "sync_count", sync_count, args, tmp)
    if args.smoke or budget.fits(args.train_seconds + 60):
        stage(results, "training", training, args, tmp, state, results)
    else: results["training"] = {"skipped": f"budget: {budget.left():.0f} s left"}
    stage(results, "evaluation_small", evaluation_small, args, state)
    for ds in [d for d in DATASETS if d in args.datasets and d != "polymnist"]:
        results["step_times"][ds] = _stage_value(results, f"step_times/{ds}", step_times, args, ds, tmp, budget,
                                                 results, 40)
    stage(results, "evaluation_full", evaluation_full, args, state, budget)
    results["wall_seconds"] = round(budget.used(), 1)
    results["table"] = table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print("\n" + results["table"] + "\n", flush=True)
    log(f"wrote {out} ({results['wall_seconds']} s; {len(results['errors'])} stage error(s))")
    return 0


def _stage_value(results, key, fn, *args):
    "A stage whose result is stored by the caller (step times per dataset)."
    holder = {"errors": results["errors"]}
    return stage(holder, key, fn, *args)


if __name__ == "__main__":
    sys.exit(main())
