"""Evaluation throughput (test examples per second) of coherence, latent classification and the 15-sample
test log-likelihood, over every subset of the modalities (issue 6, item 3).

A MoPoE model with the PolyMNIST networks (untrained: throughput does not depend on the weights) and
untrained PolyMNIST-architecture classifiers run on synthetic PolyMNIST-shaped data. By default it times
`mopoe.evaluate.evaluate` once per metric (`metrics=(name,)`), which is what a user runs; examples/s is the
number of test examples over the wall time of that call, encoder pass and fixed costs included:

- latent: encode `--num-latent-train` training examples, fit one logistic regression per subset (a fixed
  cost, reported separately from `evaluate`'s own timer), then the posterior means of all subsets for
  every test example;
- coherence: every modality generated from q(z | X_S) for every subset S and classified (2^M - 1 subsets
  x M decoders and classifiers per example), plus `num_joint` = the test size unconditional samples;
- loglik: importance-sampled log p(X) with `--num-samples` samples, jointly and given every subset
  (2^M subsets x samples x M decoder passes per example).

With `--mode primitives` (or automatically when `mopoe.evaluate` is missing or its call fails) it times the
model-level primitives instead: `model.subset_means`, `model.cond_generate(..., experts=...)` + classifiers,
`model.log_likelihood(..., experts=...)`.

With `--loglik-ab` it measures the log-likelihood of every proposal (2^M - 1 subsets and the training mixture) two
ways side by side, interleaved: one `model.log_likelihoods` call per proposal, chunked as the metric did before it was
batched (about `--decode-rows` decoded latents a call), and all proposals in one call (the metric today, the same
number of latents a call, so P times fewer rows of the batch per chunk). It prints seconds, decoder calls and
examples/s of both and their ratio.

Usage: python benchmarks/bench_eval.py [--modalities 5] [--num-test 512] [--json out.json] [--quick] [--loglik-ab]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_objective import build, machine_info, polymnist_info  # noqa: E402

class SyntheticPolyMNIST:
    "n tuples ({m: (3, 28, 28) in [0, 1]}, digit) with M modalities, fixed by `seed`."
    def __init__(self, n: int, M: int, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.x = {f"m{i}": torch.rand(n, 3, 28, 28, generator=g) for i in range(M)}
        self.y = torch.randint(10, (n,), generator=g)

    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {m: t[i] for m, t in self.x.items()}, self.y[i]


def classifiers_for(info):
    import torch

    from mopoe.nets import make_classifier
    torch.manual_seed(3)
    return {m: make_classifier(info, m) for m in info.modalities}


def time_evaluate(model, train, test, info, clfs, args) -> dict:
    "One `evaluate` call per metric: wall seconds, examples/s and evaluate's own time breakdown."
    from mopoe.evaluate import evaluate
    out = {}
    for metric in ("latent", "coherence", "loglik"):
        t = time.perf_counter()
        res = evaluate(model, train, test, info, classifiers=clfs if metric == "coherence" else None,
                       num_latent_train=args.num_latent_train, loglik_samples=args.num_samples, batch_size=args.batch,
                       progress=False, metrics=(metric,), num_joint=len(test))
        wall = time.perf_counter() - t
        out[metric] = {"seconds": wall, "examples_per_s": len(test) / wall, "evaluate_time": res.get("time", {})}
    return out


def time_primitives(model, train, test, info, clfs, args) -> dict:
    "The model-level primitives evaluate is built from, one encoder pass per test batch reused."
    import torch

    from mopoe.experts import subset_mask, subset_names
    names = subset_names(subset_mask(len(info.modalities)), info.modalities)
    T = dict(latent=0.0, coherence=0.0, loglik=0.0, encode=0.0)
    model.eval(); [c.eval() for c in clfs.values()]
    with torch.no_grad():
        for s in range(0, len(test), args.batch):
            x = {m: t[s:s + args.batch] for m, t in test.x.items()}
            t = time.perf_counter(); ex = model.experts(x); T["encode"] += time.perf_counter() - t
            t = time.perf_counter(); model.subset_means(x); T["latent"] += time.perf_counter() - t
            t = time.perf_counter()
            for sub in names:
                gen = model.cond_generate(x, given=sub.split(","), experts=ex)
                for m in info.modalities: clfs[m](gen[m]).argmax(1)
            T["coherence"] += time.perf_counter() - t
            t = time.perf_counter()
            model.log_likelihood(x, num_samples=args.num_samples, experts=ex)
            for sub in names: model.log_likelihood(x, given=sub.split(","), num_samples=args.num_samples, experts=ex)
            T["loglik"] += time.perf_counter() - t
    n = len(test)
    return {k: {"seconds": v + (T["encode"] if k != "encode" else 0.0),
                "examples_per_s": n / (v + (T["encode"] if k != "encode" else 0.0))}
            for k, v in T.items() if k != "encode"}


def loglik_ab(args) -> dict:
    "Per-proposal calls vs one batched call of `model.log_likelihoods`, interleaved, per M: seconds, decoder calls."
    import torch
    torch.set_num_threads(args.threads)
    out = {"machine": machine_info(args.threads),
           "settings": {"num_test": args.num_test, "num_samples": args.num_samples, "decode_rows": args.decode_rows,
                        "latent": args.latent, "repeats": args.repeats, "threads": args.threads}, "results": []}
    for M in args.modalities: out["results"].append(loglik_ab_at(args, M))
    out["machine"]["loadavg_end"] = os.getloadavg()
    return out


def loglik_ab_at(args, M: int) -> dict:
    "`loglik_ab` at M modalities: its own model, data and timed arms."
    import torch
    model = build("mopoe", M, args.latent).eval()
    model.check_inputs = False
    x = SyntheticPolyMNIST(args.num_test, M, 1).x
    givens, K, calls = model.all_subsets(), args.num_samples, [0]
    for d in model.decoders.values(): d.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    with torch.no_grad(): ex_all = model.experts(x)                       # one encoder pass, sliced (as the metric)

    def chunks(rows):
        from mopoe.evaluate import _chunks
        return _chunks(x, ex_all, len(x["m0"]), rows)

    def per_proposal():
        for xs, ex in chunks(max(1, args.decode_rows // K)):
            for g in givens: model.log_likelihoods(xs, [g], K, experts=ex)
            model.log_likelihoods(xs, [], K, experts=ex, training_mixture=True)

    def batched():
        for xs, ex in chunks(max(1, args.decode_rows // (K * (len(givens) + 1)))):
            model.log_likelihoods(xs, givens, K, experts=ex, training_mixture=True, decode_rows=args.decode_rows)

    arms = {"per proposal": per_proposal, "batched": batched}
    secs, ncalls = {a: [] for a in arms}, {}
    with torch.no_grad():
        batched(); per_proposal()                                                  # warm-up: caches, allocator
        for _ in range(args.repeats):
            for name, f in arms.items():
                calls[0] = 0
                t = time.perf_counter(); f(); secs[name].append(time.perf_counter() - t)
                ncalls[name] = calls[0]
    r = {"M": M, "proposals": len(givens) + 1}
    for name in arms:
        med = sorted(secs[name])[len(secs[name]) // 2]
        r[name] = {"seconds_median": med, "seconds": secs[name], "decoder_calls": ncalls[name],
                   "examples_per_s": args.num_test / med}
    r["speedup"] = r["per proposal"]["seconds_median"] / r["batched"]["seconds_median"]
    print(f"M={M}: per proposal {r['per proposal']['seconds_median']:.2f} s ({ncalls['per proposal']} decoder "
          f"calls), batched {r['batched']['seconds_median']:.2f} s ({ncalls['batched']} calls): {r['speedup']:.2f}x",
          flush=True)
    return r


def format_ab_table(res: dict) -> str:
    st = res["settings"]
    rows = ["| M | proposals | per proposal: s, decoder calls | batched: s, decoder calls | speed-up |",
            "|---|---|---|---|---|"]
    for r in res["results"]:
        a, b = r["per proposal"], r["batched"]
        rows.append(f"| {r['M']} | {r['proposals']} | {a['seconds_median']:.2f}, {a['decoder_calls']} | "
                    f"{b['seconds_median']:.2f}, {b['decoder_calls']} | {r['speedup']:.2f}x |")
    return "\n".join(rows) + (f"\n\n{st['num_test']} test tuples, {st['num_samples']} samples, ~{st['decode_rows']} "
                              f"latents a decoder call, latent {st['latent']}, median of {st['repeats']}, "
                              f"{st['threads']} thread(s)")


def run(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    res = {"machine": machine_info(args.threads), "settings": {
        "batch": args.batch, "latent": args.latent, "num_test": args.num_test,
        "num_latent_train": args.num_latent_train,
        "num_samples": args.num_samples, "threads": args.threads, "quick": args.quick, "model": "mopoe, untrained",
        "data": "synthetic PolyMNIST-shaped tensors"}, "results": []}
    for M in args.modalities:
        info = polymnist_info(M)
        info.multilabel, info.label_names = False, [str(d) for d in range(10)]
        model = build("mopoe", M, args.latent)
        clfs = classifiers_for(info)
        train, test = SyntheticPolyMNIST(args.num_latent_train, M, 0), SyntheticPolyMNIST(args.num_test, M, 1)
        r = {"M": M, "subsets": 2 ** M - 1}
        mode = args.mode
        if mode in ("auto", "evaluate"):
            try:
                r["throughput"] = time_evaluate(model, train, test, info, clfs, args); r["mode"] = "evaluate"
            except Exception as e:
                if mode == "evaluate": raise
                r["evaluate_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
                mode = "primitives"
        if mode == "primitives":
            r["throughput"] = time_primitives(model, train, test, info, clfs, args); r["mode"] = "primitives"
        res["results"].append(r)
        print(f"M={M}: " + " | ".join(f"{k} {v['examples_per_s']:.1f} ex/s ({v['seconds']:.2f} s)"
                                      for k, v in r["throughput"].items()) + f"  [{r['mode']}]", flush=True)
    res["machine"]["loadavg_end"] = os.getloadavg()
    return res


def format_table(res: dict) -> str:
    rows = ["| M | subsets | coherence (ex/s) | latent classification (ex/s) | log-likelihood, "
            f"{res['settings']['num_samples']} samples (ex/s) | timed via |", "|---|---|---|---|---|---|"]
    for r in res["results"]:
        tp = r["throughput"]
        rows.append(f"| {r['M']} | {r['subsets']} | {tp['coherence']['examples_per_s']:.1f} | "
                    f"{tp['latent']['examples_per_s']:.1f} | {tp['loglik']['examples_per_s']:.2f} | {r['mode']} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modalities", type=int, nargs="+", default=[5])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--num-test", type=int, default=512)
    p.add_argument("--num-latent-train", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("auto", "evaluate", "primitives"), default="auto")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: M=2, batch 8, latent 16, 16 test examples, 1 thread")
    p.add_argument("--json", default=None)
    p.add_argument("--loglik-ab", action="store_true", help="per-proposal vs batched log-likelihood, side by side")
    p.add_argument("--decode-rows", type=int, default=256,
                   help="latents a decoder call (--loglik-ab; the metric: 256 on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.modalities, a.batch, a.latent, a.num_test = [2], 8, 16, 16
        a.num_latent_train, a.num_samples, a.threads = 20, 3, 1
    return a


def main(argv=None):
    args = parse_args(argv)
    res = loglik_ab(args) if args.loglik_ab else run(args)
    print()
    print(format_ab_table(res) if args.loglik_ab else format_table(res))
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
