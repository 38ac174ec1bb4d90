"""FID's cost per 1,000 images on this machine, each speed-up measured side by side, and its ratio to the peak
(issue 30, item 3).

Almost all of FID's cost is pytorch-fid's InceptionV3 at 299×299 (`mopoe.fid.FIDInception`); its convolutions are
counted here with `torch.utils.flop_counter.FlopCounterMode` (11.42 GFLOPs an image, i.e. 5.71 G multiply-adds – the
"5.7 GFLOPs" torchvision quotes for Inception v3 counts multiply-adds). The images are 28×28 grey, resized to 299
inside, as for PolyMNIST and MNIST.

Settings, timed in interleaved rounds (every setting once per round, so a change of the machine's load hits all alike):
- `baseline`: the extractor before this benchmark – `torch.no_grad`, NCHW memory order, batch norms as separate layers,
  `FEATURE_BATCH_BEFORE` images a call, 1 thread;
- `inference_mode`, `channels_last`, `fold_bn`: the baseline with one speed-up each;
- `kept`: channels-last and folded batch norms (what `FIDInception` does; inference mode gained nothing and was left
  out), `kept+inference_mode`; `kept` at other batch sizes, and with 2 threads at the CPU's batch size;
- `shipped`: `FIDInception()` as the FID metric runs it on a CPU (`mopoe.fid.feature_batch_for("cpu")` images a call).

Peak: right before each timing, in the same process and with the same number of threads, float32 matmuls of
`--peak-size`² matrices repeated for `--peak-seconds` (FLOPs 2n³ each). Both are timed in wall seconds and in this
process's CPU seconds: on a shared machine other jobs take the cores away at random, which wall time counts and CPU
time does not, so `ratio_to_peak` = the setting's GFLOP per CPU second over the matmul's (`ratio_to_peak_wall`: the
same in wall time). Seconds per 1,000 images are wall time (median and best of the rounds) and CPU time. Every
setting's features are compared with the baseline's (max |difference|; the speed-ups change float32 rounding only).

`--protocols RUN_DIR` (instead of the timings) evaluates a saved run's FID (its own config, `metrics=fid`,
n = `--fid-samples`) with `fid_protocol=tensor` and `png` on the same images (the run folder is only read: results go to
the JSON).

Usage: python benchmarks/bench_fid.py [--images 64] [--rounds 3] [--json out.json] [--quick] [--protocols RUN_DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_objective import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEATURE_BATCH_BEFORE = 100                                # FID.feature_batch before issue 30


def flops_per_image(net, size=28) -> float:
    "FLOPs of one 28×28 grey image through the extractor (convolutions; FlopCounterMode counts 2 per multiply-add)."
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: net(torch.rand(2, 1, size, size))
    return fc.get_total_flops() / 2


def peak_gflops(n: int, seconds: float) -> tuple:
    "float32 matmul rate of n×n matrices over about `seconds`, threads as set: (GFLOP per wall second, per CPU second)."
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    k, t0, c0 = 0, time.perf_counter(), time.process_time()
    while (dt := time.perf_counter() - t0) < seconds or k < 2: a @ b; k += 1
    flops = 2 * n ** 3 * k / 1e9
    return flops / dt, flops / (time.process_time() - c0)


class Variant:
    """The FID Inception with a choice of speed-ups: inference mode, channels-last, folded batch norms; batch size and
    threads."""
    def __init__(self, base, inference=False, channels_last=False, fold=False, batch=FEATURE_BATCH_BEFORE, threads=1):
        import torch

        from mopoe.fid import fold_batchnorm_
        self.net = copy.deepcopy(base).eval()
        if fold: fold_batchnorm_(self.net)
        if channels_last: self.net.to(memory_format=torch.channels_last)
        self.inference, self.channels_last, self.batch, self.threads = inference, channels_last, batch, threads

    def __call__(self, x):
        import torch

        from mopoe.fid import prepare_images
        with torch.inference_mode() if self.inference else torch.no_grad():
            x = prepare_images(x)
            if self.channels_last: x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x)[0].flatten(1).clone()

    def features(self, xs):
        import torch
        return torch.cat([self(xs[i:i + self.batch]) for i in range(0, len(xs), self.batch)])


class Shipped:
    "`FIDInception()` as the FID metric calls it on a CPU: `feature_batch_for('cpu')` images a call."
    def __init__(self, ext, threads=1):
        from mopoe.fid import feature_batch_for
        self.ext, self.batch, self.threads = ext, feature_batch_for("cpu"), threads

    def features(self, xs):
        import torch
        return torch.cat([self.ext(xs[i:i + self.batch]) for i in range(0, len(xs), self.batch)])


def settings_for(args) -> dict:
    "{name: keyword arguments of Variant} (or 'shipped'), in timing order."
    from mopoe.fid import feature_batch_for
    kept = dict(channels_last=True, fold=True)
    out = {"baseline": {}, "inference_mode": dict(inference=True), "channels_last": dict(channels_last=True),
           "fold_bn": dict(fold=True), "kept": dict(kept), "kept+inference_mode": dict(kept, inference=True)}
    if args.quick: out = {"baseline": {}, "kept": dict(kept)}
    for b in args.batches:
        if b != FEATURE_BATCH_BEFORE: out[f"kept_batch{b}"] = dict(kept, batch=b)
    for t in args.threads:
        if t != 1: out[f"kept_threads{t}"] = dict(kept, threads=t, batch=feature_batch_for("cpu"))
    out["shipped"] = "shipped"
    return out


def time_features(model, xs) -> tuple:
    "(wall seconds, CPU seconds of this process) for the features of all of `xs`, after one warm-up call of a batch."
    model.features(xs[:model.batch])
    t0, c0 = time.perf_counter(), time.process_time()
    model.features(xs)
    return time.perf_counter() - t0, time.process_time() - c0


def run(args) -> dict:
    import torch

    from mopoe.fid import FIDInception, feature_batch_for
    torch.set_num_threads(1)
    if args.protocols: return {"machine": machine_info(1), "protocols": protocols(args.protocols, args)}
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    t_start = time.perf_counter()
    exact, shipped = FIDInception(cache_dir=cache, fast=False), FIDInception(cache_dir=cache)
    flops = flops_per_image(exact)
    xs = torch.rand(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    kws = settings_for(args)
    models = {n: Shipped(shipped) if kw == "shipped" else Variant(exact.net, **kw) for n, kw in kws.items()}
    ref = models["baseline"].features(xs[:min(8, len(xs))])
    diff = {n: float((m.features(xs[:len(ref)]) - ref).abs().max()) for n, m in models.items()}
    times, cpu = {n: [] for n in models}, {n: [] for n in models}
    peaks, cpu_peaks = {n: [] for n in models}, {n: [] for n in models}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for n, m in models.items():
            torch.set_num_threads(m.threads)
            p_wall, p_cpu = peak_gflops(args.peak_size, args.peak_seconds)
            t_wall, t_cpu = time_features(m, xs)
            peaks[n].append(p_wall); cpu_peaks[n].append(p_cpu); times[n].append(t_wall); cpu[n].append(t_cpu)
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1000 * times[n][-1] / len(xs):.0f}" for n in models)
              + f" s/1000 images; load {load[-1]:.2f}", flush=True)
    torch.set_num_threads(1)
    res = []
    med = statistics.median
    base, base_cpu = med(times["baseline"]), med(cpu["baseline"])
    for n, m in models.items():
        t, c = med(times[n]), med(cpu[n])
        # CPU time: the machine's load cancels
        ratios = [flops * len(xs) / s / 1e9 / p for s, p in zip(cpu[n], cpu_peaks[n], strict=True)]
        ratios_wall = [flops * len(xs) / s / 1e9 / p for s, p in zip(times[n], peaks[n], strict=True)]
        res.append({"setting": n, "threads": m.threads, "batch": m.batch,
                    "speedups": "FIDInception() as the FID metric runs it" if kws[n] == "shipped" else
                    {k: kws[n].get(k, False) for k in ("inference", "channels_last", "fold")},
                    "seconds_per_1000_images": 1000 * t / len(xs),
                    "best_seconds_per_1000_images": 1000 * min(times[n]) / len(xs),
                    "all_seconds_per_1000": [round(1000 * s / len(xs), 2) for s in times[n]],
                    "cpu_seconds_per_1000_images": 1000 * c / len(xs), "gflops_per_s": flops * len(xs) / t / 1e9,
                    "gflops_per_cpu_s": flops * len(xs) / c / 1e9, "peak_gflops_per_s": med(peaks[n]),
                    "peak_gflops_per_cpu_s": med(cpu_peaks[n]), "ratio_to_peak": med(ratios),
                    "ratio_to_peak_wall": med(ratios_wall),
                    "speedup_over_baseline": base / t, "cpu_speedup_over_baseline": base_cpu / c,
                    "max_abs_feature_diff_vs_baseline": diff[n]})
    out = {"machine": machine_info(1), "settings": {
        "images": args.images, "rounds": args.rounds, "image_shape": [1, 28, 28], "resized_to": [299, 299],
        "batches": args.batches, "threads": args.threads,
        "peak": f"float32 matmul {args.peak_size}^2, {args.peak_seconds} s, before each timing, same threads",
        "quick": args.quick, "feature_batch_shipped": feature_batch_for("cpu"),
        "feature_batch_before": FEATURE_BATCH_BEFORE, "weights": shipped.provenance.get("source")},
        "flops_per_image": flops, "gflops_per_image": flops / 1e9, "results": res, "loadavg": load,
        "wall_seconds": time.perf_counter() - t_start}
    return out


def protocols(run_dir, args) -> dict:
    """FID of a saved run with fid_protocol=tensor and png, on the same images (same seed, same n), the run folder only
    read."""
    import dataclasses

    from mopoe.build import build_data
    from mopoe.config import resolve_config
    from mopoe.fid import fid_table
    from mopoe.metric import evaluate
    from mopoe.runs import evaluation_metrics, load_run
    model, cfg, info, _ = load_run(run_dir, device="cpu", data_dir=args.data_dir)
    cfg = resolve_config(dataclasses.replace(cfg, metrics="fid", data_dir=args.data_dir,
                                             **({"fid_samples": args.fid_samples} if args.fid_samples else {})))
    train_ds, test_ds, info = build_data(cfg)
    out = {"run": str(run_dir), "fid_samples": cfg.fid_samples}
    for p in ("tensor", "png"):
        t0 = time.perf_counter()
        (metric,) = evaluation_metrics(dataclasses.replace(cfg, fid_protocol=p))
        r = evaluate(model, train_ds, test_ds, info, metrics=[metric], max_test=cfg.eval_max_test, seed=cfg.seed,
                     progress=False)
        out[p] = {"fid": r["fid"], "table": fid_table(r).round(3).to_dict(), "seconds": time.perf_counter() - t0}
        print(f"fid_protocol={p}:\n{fid_table(r).round(2)}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images timed per setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 100])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--peak-seconds", type=float, default=1.0)
    ap.add_argument("--cache-dir", default=str(ROOT / "data" / "fid"),
                    help="the converted weights' cache ('' for none)")
    ap.add_argument("--protocols", default=None,
                    help="a run folder: its FID with fid_protocol=tensor and png (no timings)")
    ap.add_argument("--fid-samples", type=int, default=None,
                    help="with --protocols: n (default: the run's fid_samples)")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4 images, one round, baseline and kept, batches 2 and 4")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.batches, args.peak_size, args.peak_seconds = 4, 1, [2, 4], 512, 0.05
    res = run(args)
    for r in res.get("results", []):
        print(f"{r['setting']:>16}: {r['seconds_per_1000_images']:7.1f} s/1000 images, "
              f"{r['gflops_per_s']:6.1f} GFLOP/s, "
              f"CPU {r['cpu_seconds_per_1000_images']:6.1f} s/1000, {100 * r['ratio_to_peak']:5.1f}% of peak "
              f"({r['peak_gflops_per_cpu_s']:.0f} GFLOP per CPU s, {r['threads']} thread(s)), "
              f"×{r['speedup_over_baseline']:.2f} wall, ×{r['cpu_speedup_over_baseline']:.2f} CPU, "
              f"max |Δfeature| {r['max_abs_feature_diff_vs_baseline']:.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
