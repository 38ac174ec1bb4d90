"""Cost of the multimodal objectives over the bare networks, and of the subset fusion alone (issue 6).

For each number of modalities M the script builds the PolyMNIST encoders/decoders (conv nets of
`mopoe.nets`, 3x28x28 images, Laplace likelihood with scale 0.75, beta 2.5, prior expert on the full set)
on synthetic tensors of PolyMNIST's shape and times, interleaved in one process, one Adam training step
(zero_grad + forward + backward + optimizer.step) of

- ``bare``: the same encoders and decoders trained as M independent single-Gaussian VAEs: every modality is
  encoded, reparameterized with its own Gaussian, decoded by its own decoder, Laplace log-likelihood minus
  beta * KL(q(z|x_m) || N(0, I)), summed over modalities, mean over the batch. Same network work as MoPoE
  (M encoder passes, M decoder passes over B rows), no fusion.
- ``mopoe``, ``mvae``, ``mmvae``, ``subset_elbos`` (Eq. 5): `mopoe.model.MultimodalVAE.loss` with that objective and
  its default settings (MoPoE: ``kl="auto"``; MVAE: the prior expert in every product and the unimodal ELBOs, which
  decode every modality a second time). ``subset_elbos`` decodes every subset (2^M - 1 times M decoder passes); it is
  measured up to ``--powerset-max-m`` and extrapolated (clearly marked) beyond.
- ``mopoe_masked``: MoPoE with a per-tuple availability mask (each modality of each tuple missing with probability
  0.25, at least one kept; the missing entries hold NaN) – the cost of per-tuple subsets.
- ``mopoe_exact``: MoPoE with ``kl="subset_average"`` (the exact subset-average KL, the default before ``auto``).
- with ``--successors``: the objectives of issue 29 that are registered (``mmvm``, ``code_vae``, ``cmvae``), each with
  its default options, timed in the same interleaved rounds as MoPoE (an objective that needs private latents gets
  ``SUCCESSOR_PRIVATE_DIM`` of them).

and separately the fusion alone on random experts (M, B, D) that require grad: MixtureOfProducts
+ stratified component ids + rsample + mean_kl (the exact KL of every subset) + backward with a random
upstream gradient for z. For comparison it also times the fusion with a *sampled* KL (the KL of the one
component each row drew, an unbiased estimate of the mean over subsets) and reports that estimator's
relative standard deviation on the same experts; the library default is the exact chunked KL.

Peak memory: every (variant, M) runs in a fresh interpreter that imports, builds the model, optimizer and
data, runs two steps and reports its peak resident set (VmHWM; ru_maxrss would include the parent's peak,
which Linux carries across fork+exec) and the resident set after the imports; torch CPU allocations are
invisible to tracemalloc.

Trainer A/B (issue 21, ``--trainer-ab TREE [TREE ...]``): the per-step cost of `mopoe.train.train` itself (data
batching, the loop, its callbacks, the optimizer) of this tree against other checkouts of mopoe (e.g. an earlier
commit exported with ``git archive``). Each measurement is a fresh interpreter with ``PYTHONPATH`` set to one tree that
trains PolyMNIST's cpu preset nets (M = 5, latent 64, batch 64, random uint8 tuples) for ``K0`` and for ``K0 + K``
steps in one process, after an untimed one-step run (imports, lazy caches); (T(K0 + K) - T(K0)) / K is the step time
without the fixed costs (building the model, the first steps). The trees alternate within every round (order
rotated), ``--repeats`` rounds, median and spread reported.

Usage: python benchmarks/bench_objective.py [--modalities 2 3 5 8 10 12] [--json out.json] [--quick] [--successors]
       python benchmarks/bench_objective.py --trainer-ab /tmp/b802ad6 [--repeats 5] [--json ab.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

VARIANTS = ("bare", "mopoe", "mopoe_masked", "mopoe_exact", "mvae", "mmvae", "subset_elbos")
SUCCESSORS = ("mmvm", "code_vae", "cmvae")      # issue 29's objectives, timed with --successors where registered
SUCCESSOR_PRIVATE_DIM = 32                        # private latents of a successor that needs them (CMVAE, as MMVAE+)
MISSING_RATE = 0.25


def _rss_mb() -> float:
    "Current resident set size of this process (MB)."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    """Peak resident set size of this process (MB): VmHWM of /proc/self/status.

    Not ru_maxrss: Linux carries the parent's peak into a fork+exec'ed child, so a child of a 1-GB benchmark
    process would report at least 1 GB. VmHWM belongs to the address space the exec created."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def polymnist_info(M: int):
    "A stand-in DatasetInfo with M PolyMNIST-shaped modalities m0..m{M-1}."
    names = [f"m{i}" for i in range(M)]
    return SimpleNamespace(name="polymnist", modalities=names, shapes={m: (3, 28, 28) for m in names},
                           likelihoods={m: "laplace" for m in names}, data_dims={m: 3 * 28 * 28 for m in names},
                           num_classes=10, alphabet=None)


def build(variant: str, M: int, latent: int, seed: int = 0, beta: float = 2.5, scale: float = 0.75):
    "The MultimodalVAE of `variant` (the bare variant uses the mopoe model's networks and likelihoods)."
    import torch

    from mopoe.likelihoods import get_likelihood
    from mopoe.model import MultimodalVAE, default_rec_weights
    from mopoe.nets import make_networks
    info = polymnist_info(M)
    torch.manual_seed(seed)
    enc, dec = make_networks(info, latent, 0)
    liks = {m: get_likelihood("laplace", scale=scale) for m in info.modalities}
    objective = "mopoe" if variant in ("bare", "mopoe_masked", "mopoe_exact") else variant
    kl = "subset_average" if variant == "mopoe_exact" else "auto"
    private = SUCCESSOR_PRIVATE_DIM if variant in SUCCESSORS and _needs_private(variant) else 0
    if private: enc, dec = make_networks(info, latent, private)
    model = MultimodalVAE(enc, dec, liks, latent, private, objective=objective,
                          rec_weights=default_rec_weights(info.data_dims), shapes=info.shapes, kl=kl)
    model.bench_beta = beta                                  # the KL weight the steps use (the model holds no β)
    return model


def _needs_private(objective: str) -> bool:
    from mopoe.objectives import OBJECTIVES
    return bool(getattr(OBJECTIVES[objective], "needs_private", False))


def registered_successors() -> list:
    "The objectives of SUCCESSORS that mopoe registers (after loading the modules that register more)."
    from mopoe.objectives import OBJECTIVES, load_objectives
    load_objectives()
    return [v for v in SUCCESSORS if v in OBJECTIVES]


def make_observed(M: int, batch: int, rate: float = MISSING_RATE, seed: int = 3):
    "A (B, M) availability mask: each entry missing with probability `rate`, at least one modality per tuple."
    import torch
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(batch, M, generator=g) >= rate
    keep = torch.randint(M, (batch,), generator=g)
    obs[torch.arange(batch), keep] = True
    return obs


def bare_loss(model, x: dict):
    "M independent single-Gaussian VAEs on the model's encoders/decoders: negative ELBO summed over modalities."
    import torch

    from mopoe.experts import gaussian_kl
    total = 0.0
    for m in model.modalities:
        mu, lv = model.encoders[m](x[m])
        z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        rec = model.rec_weights[m] * model.likelihoods[m].log_prob(model.decoders[m](z), x[m])
        total = total + rec - model.bench_beta * gaussian_kl(mu, lv)
    return -total.mean()


def make_step(variant: str, model, x: dict, lr: float = 1e-3):
    "A closure running one training step of `variant` (zero_grad, forward, backward, Adam step)."
    import torch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if variant == "mopoe_masked":
        import torch
        M, B = len(x), next(iter(x.values())).shape[0]
        obs = make_observed(M, B)
        x = {m: torch.where(obs[:, i, None, None, None], t, torch.full_like(t, float("nan")))
             for i, (m, t) in enumerate(x.items())}
        loss_fn = lambda: model.loss(x, beta=model.bench_beta, observed=obs)[0]
    elif variant == "bare": loss_fn = lambda: bare_loss(model, x)
    else: loss_fn = lambda: model.loss(x, beta=model.bench_beta)[0]
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def make_data(M: int, batch: int, seed: int = 1):
    "Synthetic PolyMNIST-shaped batch {m: (B, 3, 28, 28)} in [0, 1]."
    import torch
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": torch.rand(batch, 3, 28, 28, generator=g) for i in range(M)}


def make_fusion(M: int, batch: int, latent: int, kl: str = "subset_average", seed: int = 2):
    "A closure timing the fusion alone on random experts: rsample + the KL estimator `kl` + backward."
    import torch

    from mopoe.experts import MixtureOfProducts, component_ids, gaussian_kl, poe_rows, sampled_subset_kl, subset_mask
    from mopoe.objectives import KL_SAMPLES
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(M, batch, latent, generator=g).requires_grad_()
    lv = (0.5 * torch.randn(M, batch, latent, generator=g)).requires_grad_()
    gz = torch.randn(batch, latent, generator=g)
    mask = subset_mask(M)
    def fusion():
        mu.grad = lv.grad = None
        q = MixtureOfProducts(mu, lv, mask, "full")
        ids = component_ids(q.num_components, batch, "stratified")
        z = q.rsample(ids=ids)
        if kl == "subset_average": k = q.mean_kl()
        elif kl == "subset_sample": k = sampled_subset_kl(mu, lv, mask, q.prior, KL_SAMPLES)
        else: k = gaussian_kl(*poe_rows(mu, lv, mask[ids], q.prior[ids]))     # row_subset: KL of the drawn component
        ((z * gz).sum(-1) + k).mean().backward()
        return float(k.mean().detach())
    return fusion, (mu, lv, mask)


def sampled_kl_spread(mu, lv, mask, draws: int = 30) -> dict:
    "Exact batch-mean KL and, per sampled estimator, the mean/std over draws of its batch mean and of one row's value."
    import torch

    from mopoe.experts import MixtureOfProducts, component_ids, gaussian_kl, poe_rows, sampled_subset_kl
    from mopoe.objectives import KL_SAMPLES
    with torch.no_grad():
        q = MixtureOfProducts(mu, lv, mask, "full")
        exact_rows = q.mean_kl()
        exact = float(exact_rows.mean())
        est = {"row_subset": [], "subset_sample": []}
        for _ in range(draws):
            ids = component_ids(q.num_components, mu.shape[1], "stratified")
            est["row_subset"].append(gaussian_kl(*poe_rows(mu, lv, mask[ids], q.prior[ids])))
            est["subset_sample"].append(sampled_subset_kl(mu, lv, mask, q.prior, KL_SAMPLES))
    out = {"exact_batch_mean_kl": exact, "draws": draws}
    for name, rows in est.items():
        rows = torch.stack(rows)                                           # (draws, B)
        means = rows.mean(1).tolist()
        out[name] = {"batch_mean": statistics.fmean(means), "batch_mean_std": statistics.stdev(means),
                     "relative_std_batch": statistics.stdev(means) / exact,
                     "relative_std_per_row": float((rows.std(0) / exact_rows).mean()),
                     "bias_in_standard_errors": ((statistics.fmean(means) - exact)
                                                 / (statistics.stdev(means) / draws ** 0.5))}
    # the earlier field names: the one-component-per-row estimator
    out.update(sampled_mean=out["row_subset"]["batch_mean"], sampled_std=out["row_subset"]["batch_mean_std"],
               relative_std=out["row_subset"]["relative_std_batch"])
    return out


def _summary(ts):
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "all": ts}


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    "Median time of each closure, run round-robin (order rotated every repeat) after `warmup` calls each."
    for _ in range(warmup):
        for f in fns.values(): f()
    names, out = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2: order = order[::-1]
        for n in order:
            gc.collect()
            t = time.perf_counter(); fns[n](); out[n].append(time.perf_counter() - t)
    return {n: _summary(ts) for n, ts in out.items()}


def child_memory(variant: str, M: int, batch: int, latent: int, threads: int) -> dict:
    "Peak RSS of two training steps of `variant` (or the fusion) in this fresh process."
    import torch

    import mopoe.experts  # noqa: F401  (imports are part of the baseline)
    import mopoe.model  # noqa: F401
    import mopoe.nets  # noqa: F401
    torch.set_num_threads(threads)
    after_import = _rss_mb()
    if variant in ("fusion", "fusion_sampled_kl"):
        f, _ = make_fusion(M, batch, latent, "subset_average" if variant == "fusion" else "row_subset")
    else:
        f = make_step(variant, build(variant, M, latent), make_data(M, batch))
    before = _rss_mb()
    for _ in range(2): f()
    return {"after_import_mb": after_import, "before_step_mb": before, "peak_rss_mb": _maxrss_mb(),
            "peak_over_import_mb": _maxrss_mb() - after_import}


def measure_memory(variant: str, M: int, args) -> dict:
    "Run `child_memory` in a fresh interpreter."
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, str(M), "--batch", str(args.batch),
           "--latent", str(args.latent), "--threads", str(args.threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout} s"}
    if p.returncode != 0: return {"error": (p.stderr or "").strip().splitlines()[-1:] or [f"exit {p.returncode}"]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def powerset_fit(results: list) -> dict | None:
    "Least-squares fit of subset_elbos - bare step time against (2^M - 1) * M decoder passes, from the measured M."
    pts = [(r["subsets"] * r["M"], r["times"]["subset_elbos"]["median"] - r["times"]["bare"]["median"])
           for r in results if "subset_elbos" in r["times"]]
    if not pts: return None
    c = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
    return {"seconds_per_subset_decoder_pass": c, "from_M": [r["M"] for r in results if "subset_elbos" in r["times"]]}


def machine_info(threads: int) -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError: pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def run(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    res = {"machine": machine_info(args.threads), "settings": {
        "batch": args.batch, "latent": args.latent, "repeats": args.repeats, "modalities": args.modalities,
        "threads": args.threads, "quick": args.quick, "powerset_max_m": args.powerset_max_m,
        "beta": 2.5, "likelihood": "laplace(scale=0.75)", "prior_expert": "auto", "kl": "auto",
        "optimizer": "Adam(lr=1e-3)",
        "missing_rate_of_mopoe_masked": MISSING_RATE, "successors": args.successors,
        "bare": "M independent single-Gaussian VAEs on the same encoders/decoders (Laplace log-lik - beta*KL)"},
        "results": []}
    t_start = time.perf_counter()
    for M in args.modalities:
        variants = [v for v in VARIANTS if v != "subset_elbos" or M <= args.powerset_max_m] + list(args.successors)
        x = make_data(M, args.batch)
        fns = {v: make_step(v, build(v, M, args.latent), x) for v in variants}
        fus, experts = make_fusion(M, args.batch, args.latent, "subset_average")
        fus_s, _ = make_fusion(M, args.batch, args.latent, "row_subset")
        fus_ss, _ = make_fusion(M, args.batch, args.latent, "subset_sample")
        fns["fusion"], fns["fusion_sampled_kl"], fns["fusion_subset_sample"] = fus, fus_s, fus_ss
        times = time_interleaved(fns, args.repeats)
        bare = times["bare"]["median"]
        r = {"M": M, "subsets": 2 ** M - 1,
             "times": {v: times[v] for v in variants},
             "ratio_to_bare": {v: times[v]["median"] / bare for v in variants},
             "masked_over_complete": times["mopoe_masked"]["median"] / times["mopoe"]["median"],
             "fusion": times["fusion"], "fusion_sampled_kl": times["fusion_sampled_kl"],
             "fusion_subset_sample": times["fusion_subset_sample"],
             "fusion_fraction_of_mopoe_step": times["fusion"]["median"] / times["mopoe"]["median"],
             "fusion_per_subset_element_ns": (times["fusion"]["median"] / ((2 ** M - 1) * args.batch * args.latent)
                                              * 1e9),
             "sampled_kl": sampled_kl_spread(*experts)}
        del fns, x, fus, fus_s, fus_ss, experts; gc.collect()
        if M in args.memory_modalities:
            mem = {v: measure_memory(v, M, args) for v in variants + ["fusion"] if v in args.memory_variants}
            r["memory"] = mem
            if "peak_rss_mb" in mem.get("mopoe", {}) and "peak_rss_mb" in mem.get("mopoe_masked", {}):
                r["memory_masked_over_complete"] = mem["mopoe_masked"]["peak_rss_mb"] / mem["mopoe"]["peak_rss_mb"]
            if "peak_rss_mb" in mem["bare"]:
                r["memory_ratio_to_bare"] = {v: m["peak_rss_mb"] / mem["bare"]["peak_rss_mb"]
                                             for v, m in mem.items() if "peak_rss_mb" in m}
                r["memory_increment_over_bare_mb"] = {v: m["peak_rss_mb"] - mem["bare"]["peak_rss_mb"]
                                                     for v, m in mem.items() if "peak_rss_mb" in m}
        res["results"].append(r)
        print(format_row(r), flush=True)
    fit = powerset_fit(res["results"])
    if fit:
        res["powerset_fit"] = fit
        for r in res["results"]:
            if "subset_elbos" not in r["times"]:
                t = r["times"]["bare"]["median"] + fit["seconds_per_subset_decoder_pass"] * r["subsets"] * r["M"]
                r["powerset_extrapolated"] = {"seconds": t, "ratio_to_bare": t / r["times"]["bare"]["median"]}
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_seconds"] = time.perf_counter() - t_start
    res["targets"] = check_targets(res["results"])
    return res


def check_targets(results: list) -> dict:
    "The issue's targets, where the run measured them."
    by = {r["M"]: r for r in results}
    t = {}
    if 5 in by:
        t["mopoe_step_le_1.10x_bare_at_M5"] = {"value": by[5]["ratio_to_bare"]["mopoe"],
                                               "met": by[5]["ratio_to_bare"]["mopoe"] <= 1.10}
    if 10 in by:
        t["mopoe_step_le_1.25x_bare_at_M10"] = {"value": by[10]["ratio_to_bare"]["mopoe"],
                                                "met": by[10]["ratio_to_bare"]["mopoe"] <= 1.25}
    if 10 in by and "memory_ratio_to_bare" in by[10]:
        v = by[10]["memory_ratio_to_bare"].get("mopoe")
        if v is not None: t["mopoe_peak_memory_le_1.5x_bare_at_M10"] = {"value": v, "met": v <= 1.5}
    for M in (5, 10):
        if M in by:
            v = by[M]["masked_over_complete"]
            t[f"masked_step_within_5pct_of_complete_at_M{M}"] = {"value": v, "met": abs(v - 1) <= 0.05}
            if "memory_masked_over_complete" in by[M]:
                v = by[M]["memory_masked_over_complete"]
                t[f"masked_peak_memory_within_5pct_at_M{M}"] = {"value": v, "met": abs(v - 1) <= 0.05}
    if 12 in by:
        t["fusion_fraction_of_step_at_M12"] = {"value": by[12]["fusion_fraction_of_mopoe_step"],
                                               "met": by[12]["fusion_fraction_of_mopoe_step"] <= 0.1}
    return t


def format_row(r: dict) -> str:
    tm = r["times"]
    cells = [f"M={r['M']:>2} K={r['subsets']:>4}", f"bare {tm['bare']['median']:.3f}s"]
    for v in VARIANTS[1:] + SUCCESSORS:
        if v in tm: cells.append(f"{v} {tm[v]['median']:.3f}s ({r['ratio_to_bare'][v]:.2f}x)")
    for v in SUCCESSORS:
        if v in tm: cells.append(f"{v}/mopoe {tm[v]['median'] / tm['mopoe']['median']:.2f}")
    cells.append(f"fusion {r['fusion']['median']:.3f}s ({100 * r['fusion_fraction_of_mopoe_step']:.0f}% of mopoe step)")
    cells.append(f"fusion(row_subset KL) {r['fusion_sampled_kl']['median']:.3f}s")
    cells.append(f"fusion(subset_sample KL) {r['fusion_subset_sample']['median']:.3f}s")
    cells.append(f"masked/complete {r['masked_over_complete']:.3f}")
    return " | ".join(cells)


def format_table(res: dict) -> str:
    "A markdown table of the run."
    rows = ["| M | subsets | bare (s) | mopoe (default) | mopoe masked | masked / complete | mopoe, exact KL | mvae "
            "| mmvae | subset_elbos (Eq. 5) | fusion, exact KL (s) | fusion, subset_sample (s) "
            "| fusion, row_subset (s) | peak RSS bare (GB) | peak RSS mopoe (GB) | mopoe / bare memory "
            "| masked / complete memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        tm, ra = r["times"], r["ratio_to_bare"]
        cell = lambda v: f"{tm[v]['median']:.3f} s ({ra[v]:.2f}×)" if v in tm else "–"  # noqa: B023
        if "subset_elbos" in tm: ps = cell("subset_elbos")
        elif "powerset_extrapolated" in r:
            e = r["powerset_extrapolated"]; ps = f"≈{e['seconds']:.0f} s ({e['ratio_to_bare']:.0f}×), extrapolated"
        else: ps = "–"
        mem = r.get("memory", {})
        gb = lambda v: f"{mem[v]['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in mem.get(v, {}) else "–"  # noqa: B023
        mr = r.get("memory_ratio_to_bare", {}).get("mopoe")
        mm = r.get("memory_masked_over_complete")
        rows.append(f"| {r['M']} | {r['subsets']} | {tm['bare']['median']:.3f} | {cell('mopoe')} | "
                    f"{cell('mopoe_masked')} | {r['masked_over_complete']:.3f} | {cell('mopoe_exact')} | "
                    f"{cell('mvae')} | {cell('mmvae')} | {ps} | {r['fusion']['median']:.3f} | "
                    f"{r['fusion_subset_sample']['median']:.3f} | "
                    f"{r['fusion_sampled_kl']['median']:.3f} | {gb('bare')} | {gb('mopoe')} | "
                    f"{'–' if mr is None else f'{mr:.2f}×'} | {'–' if mm is None else f'{mm:.3f}'} |")
    return "\n".join(rows)


def format_successors(res: dict) -> str:
    "A markdown table of the successors' step times beside MoPoE's, measured in the same interleaved rounds."
    names = res["settings"]["successors"]
    rows = ["| M | mopoe (ms/step) | " + " | ".join(f"{n} (ms/step, × mopoe)" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
    for r in res["results"]:
        tm = r["times"]
        mp = tm["mopoe"]["median"]
        rows.append(f"| {r['M']} | {1000 * mp:.1f} | " + " | ".join(
            f"{1000 * tm[n]['median']:.1f} ({tm[n]['median'] / mp:.2f}×)" for n in names) + " |")
    return "\n".join(rows)


def trainer_child(steps0: int, steps: int, threads: int) -> dict:
    "In a tree's interpreter: seconds of `train` for steps0 and steps0 + steps PolyMNIST cpu-preset steps."
    import tempfile
    import warnings

    import torch
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    import mopoe.train as T
    from mopoe.data import DatasetInfo, MultimodalDataset
    mods = [f"m{i}" for i in range(5)]
    info = DatasetInfo("polymnist", mods, {m: (3, 28, 28) for m in mods}, {m: "laplace" for m in mods},
                       {m: 2352 for m in mods}, 10, False, [str(i) for i in range(10)], {m: True for m in mods})
    def ds(n, seed):
        g = torch.Generator().manual_seed(seed)
        return MultimodalDataset({m: torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8)
                                  for m in mods}, torch.randint(0, 10, (n,), generator=g), {m: "image" for m in mods})
    times = {}
    for k in (1, steps0, steps0 + steps):                      # the first run warms imports and caches (untimed)
        cfg = T.resolve_config(dataset="polymnist", preset="cpu", device="cpu", seed=0, epochs=1,
                               out_dir=tempfile.mkdtemp(), data_dir=tempfile.mkdtemp())
        data = (ds((k + 2) * cfg.batch_size, 0), ds(16, 1), info)       # stops mid-epoch: no test loss, no checkpoint
        t = time.perf_counter()
        if hasattr(T, "StopAfter"): T.train(cfg, callbacks=[T.StopAfter(k)], data=data, progress=False)
        else: T.train(cfg, data=data, progress=False, stop_after_steps=k)
        times[k] = time.perf_counter() - t
    return {"seconds": times, "step_s": (times[steps0 + steps] - times[steps0]) / steps,
            "batch_size": cfg.batch_size, "latent_dim": cfg.latent_dim, "torch_threads": torch.get_num_threads()}


def trainer_ab(args) -> dict:
    "Alternate child interpreters over the trees (this one first: '.') for --repeats rounds."
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [here] + [os.path.abspath(t) for t in args.trainer_ab]
    per = {t: [] for t in trees}
    t0 = time.time()
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = trees[r % len(trees):] + trees[:r % len(trees)]
        for tree in order:
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--trainer-child", str(args.ab_steps0),
                                str(args.ab_steps), "--threads", str(args.threads)], env=env, capture_output=True,
                               text=True, timeout=args.child_timeout, cwd=tree)
            if p.returncode != 0: raise RuntimeError(f"trainer child in {tree} failed: {p.stderr[-1500:]}")
            out = json.loads(p.stdout.strip().splitlines()[-1])
            per[tree].append(out["step_s"])
            print(f"round {r + 1} {tree}: {out['step_s'] * 1000:.1f} ms/step", flush=True)
        load.append(os.getloadavg()[0])
    stats = {t: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v}
             for t, v in per.items()}
    base = stats[here]["median_s"]
    return {"trees": trees, "this_tree": here,
            "settings": {"steps0": args.ab_steps0, "steps": args.ab_steps, "repeats": args.repeats,
                         "threads": args.threads,
                         "setup": "PolyMNIST cpu preset: M=5, latent 64, batch 64, random uint8 tuples"},
            "step_time": stats, "ratio_to_this_tree": {t: s["median_s"] / base for t, s in stats.items()},
            "load_average": load, "wall_seconds": time.time() - t0,
            "machine": platform.processor() or platform.machine()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modalities", type=int, nargs="+", default=[2, 3, 5, 8, 10, 12])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--powerset-max-m", type=int, default=5, help="measure Eq. 5 up to this M, extrapolate beyond")
    p.add_argument("--memory-modalities", type=int, nargs="*", default=None,
                   help="the M whose peak memory is measured (default: all; --quick: the smallest)")
    p.add_argument("--memory-variants", nargs="+", default=list(VARIANTS) + ["fusion"],
                   help="the variants whose peak memory is measured (--quick: bare, mopoe)")
    p.add_argument("--child-timeout", type=int, default=300)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: batch 8, latent 16, M = 2 3, 2 repeats, 1 thread, memory of bare and mopoe "
                        "at M=2")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--successors", action="store_true",
                   help=f"also time the registered objectives of {', '.join(SUCCESSORS)} beside MoPoE (issue 29)")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "M"), help=argparse.SUPPRESS)
    p.add_argument("--trainer-ab", nargs="+", default=None, metavar="TREE",
                   help="time mopoe.train's step in this tree and in these checkouts (alternating child interpreters)")
    p.add_argument("--ab-steps0", type=int, default=3, help="trainer A/B: steps of the short run (fixed costs)")
    p.add_argument("--ab-steps", type=int, default=20, help="trainer A/B: extra steps of the long run (timed)")
    p.add_argument("--trainer-child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.latent, a.repeats, a.modalities, a.threads = 8, 16, 2, [2, 3], 1
        a.memory_variants = ["bare", "mopoe", "mopoe_masked"]
    if a.memory_modalities is None: a.memory_modalities = a.modalities[:1] if a.quick else list(a.modalities)
    a.successors = registered_successors() if a.successors else []
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(args.child[0], int(args.child[1]), args.batch, args.latent, args.threads)))
        return
    if args.trainer_child:
        print(json.dumps(trainer_child(*args.trainer_child, args.threads)))
        return
    if args.trainer_ab:
        res = trainer_ab(args)
        for t, s in res["step_time"].items():
            print(f"{t}: median {s['median_s'] * 1000:.1f} ms/step (min {s['min_s'] * 1000:.1f}, "
                  f"max {s['max_s'] * 1000:.1f}), ratio to this tree {res['ratio_to_this_tree'][t]:.3f}")
        print(f"load average during the run: {', '.join(f'{x:.1f}' for x in res['load_average'])}")
        if args.json:
            with open(args.json, "w") as f: json.dump(res, f, indent=1)
        return res
    res = run(args)
    print()
    print(format_table(res))
    if args.successors: print(); print(format_successors(res))
    for k, v in res["targets"].items(): print(f"{k}: {v['value']:.3f} -> {'met' if v['met'] else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
