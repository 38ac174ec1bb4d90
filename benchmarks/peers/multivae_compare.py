"""mopoe beside MultiVae on identical networks: the same loss first, then step time and quality (issue 31).

One command builds mopoe's networks for a dataset preset (`mopoe.train.resolve_config` + `build_model`), hands deep
copies of the very same modules (same initial weights) to MultiVae's model of the same objective
(`multivae_pairs.py`), feeds both the same batches in the same order, and reports, in this order:

1. **The equal-loss check** (before anything is timed): on one batch, both libraries' loss and gradients given the
   same draws – MoPoE: MultiVae's own row-to-subset assignment (captured from its selection method) handed to mopoe's
   objective; MMVAE+: MultiVae's own Laplace noise handed to mopoe; MVAE: the same seed. Complete data and, with the
   same masks (MultiVae's `IncompleteDataset` masks = mopoe's `observed`), incomplete data. Also printed: how many rows
   MultiVae's contiguous blocks give each subset and the full set, against Eq. 6's B/K. A failed check stops the run
   before any timing (exit 1), so a speed ratio never compares different work.
2. **Step time** (zero_grad + loss + backward + Adam step), interleaved rounds in one process: every contestant of a
   setting runs its steps in each round (order rotated and reversed every round), on the same cycled batches; the
   median over rounds per contestant, and two ratios MultiVae / mopoe: of the medians, and the median of the per-round
   ratios. mopoe's MoPoE is timed twice: with the exact subset-average KL (`kl=subset_average`, the work MultiVae
   does – the loss-checked pair) and with its default (`kl=auto`: sampled above 31 subsets, M >= 6).
3. **Quality after N steps** (MoPoE): both trained from the same initial weights on the same batches in the same order
   (each with its own random stream), then both scored by mopoe's evaluator (`mopoe.metric.evaluate`) with the same
   classifiers (`mopoe.evaluate.train_classifiers`): coherence by number of inputs, latent classification, joint
   coherence, log p(X) (FID with `--fid`). Seeds as an option; mean ± s.d. per library, the difference, a Welch t-test
   (scipy); a difference is called a lead only with >= 2 seeds a side and p < 0.05.

Usage:
    python benchmarks/peers/multivae_compare.py --smoke                  # every stage at tiny sizes (CI, < 1 min)
    python benchmarks/peers/multivae_compare.py --stages check,speed --speed-modalities 3 5 8 10
    python benchmarks/peers/multivae_compare.py --stages check,quality --quality-modalities 5 --steps 1500 --seeds 0 1 2
Needs the optional extra: pip install -e ".[peers]" (MultiVae).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import multivae_pairs as P  # noqa: E402

STAGES = ("check", "speed", "quality")
SMOKE = dict(speed_modalities=[3], check_modalities=[3], quality_modalities=3, batch_size=16, latent_dim=16,
             num_train=256, num_test=64, steps=6, seeds=[0, 1], rounds=2, steps_per_round=1, speed_batches=2,
             round_seconds=0.0, classifier_epochs=1, eval_max_test=32, loglik_max_test=4, num_latent_train=64)


# ---------------------------------------------------------------------------------------------------------------
# setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every stage, M = 3 (CI)")
    p.add_argument("--stages", default="check,speed,quality",
                   help="comma list of check, speed, quality (check always runs first)")
    p.add_argument("--dataset", default="polymnist", help="a registered mopoe dataset (its cpu preset and networks)")
    p.add_argument("--source", default="offline")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--pairs", default="mopoe,mvae,mmvaeplus,mmvae",
                   help="objectives to check and time: mopoe, mvae, mmvaeplus, mmvae (mmvae: timed apart, no check)")
    p.add_argument("--check-modalities", type=int, nargs="+", default=None,
                   help="M of the check (default: the speed M's and the quality M)")
    p.add_argument("--speed-modalities", type=int, nargs="+", default=[3, 5, 8, 10])
    p.add_argument("--quality-modalities", type=int, default=5)
    p.add_argument("--missing-rate", type=float, default=0.25,
                   help="masked settings: each modality of a tuple missing with this probability")
    p.add_argument("--quality-missing-rate", type=float, default=0.0,
                   help="train the quality pair on incomplete tuples (0: complete)")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="latent size (default: the preset's; MMVAE+: half shared, half private)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median over them)")
    p.add_argument("--steps-per-round", type=int, default=1, help="at least this many steps a contestant and round")
    p.add_argument("--round-seconds", type=float, default=2.0,
                   help="more steps a round for fast contestants: about this long (from the warm-up step's time)")
    p.add_argument("--speed-batches", type=int, default=4, help="distinct batches the timed steps cycle through")
    p.add_argument("--steps", type=int, default=1500, help="training steps of the quality stage")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--eval-max-test", type=int, default=1000)
    p.add_argument("--loglik-max-test", type=int, default=100)
    p.add_argument("--num-latent-train", type=int, default=500)
    p.add_argument("--fid", action="store_true", help="also FID (slow on a CPU; needs the fid extra)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-abort", action="store_true",
                   help="time even if the equal-loss check fails (reported as failed)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every stage)")
    p.add_argument("--md", default=None, help="write the printed tables here as markdown (rewritten after every stage)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print (with --md: write) the tables of a results JSON this script wrote; nothing is run "
                        "(with --json: also write the JSON with its derived tables recomputed)")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            if k == "check_modalities" or getattr(a, k) == p.get_default(k): setattr(a, k, v)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if bad := [s for s in a.stages if s not in STAGES]: p.error(f"unknown stages {bad}; choose from {STAGES}")
    a.pairs = [s.strip() for s in a.pairs.split(",") if s.strip()]
    if bad := [s for s in a.pairs if s not in P.PAIRS or s == "mopoe_auto"]: p.error(f"unknown pairs {bad}")
    if a.check_modalities is None:
        a.check_modalities = sorted(set((a.speed_modalities if "speed" in a.stages else [])
                                        + ([a.quality_modalities] if "quality" in a.stages else [])))
    return a


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_info(threads: int) -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError: pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "gpu": None, "loadavg_start": list(os.getloadavg())}


def versions() -> dict:
    import torch

    import mopoe
    out = {"mopoe": getattr(mopoe, "__version__", "?"), "multivae": P.multivae_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version
        out["pythae"] = version("pythae")
    except Exception: pass
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        out["mopoe_commit"] = head or None
    except OSError: out["mopoe_commit"] = None
    return out


_DATA = {}


def load_data(args, M: int, num_train: int, num_test: int):
    "(train, test, info) of the dataset, cached per (M, sizes) in this process."
    from mopoe.data import get_datasets
    key = (M if args.dataset == "polymnist" else None, num_train, num_test)
    if key not in _DATA:
        opts = {"num_modalities": M} if args.dataset == "polymnist" else {}
        _DATA[key] = get_datasets(args.dataset, root=args.data_dir, source=args.source, num_train=num_train,
                                  num_test=num_test, **opts)
    return _DATA[key]


def resolve(args, pair: str, M: int, seed: int = 0):
    "The resolved mopoe config of `pair` on the dataset preset (latent, batch from the preset unless given)."
    from mopoe.train import resolve_config
    opts = {"num_modalities": M} if args.dataset == "polymnist" else {}
    base = resolve_config(dataset=args.dataset, source=args.source, **opts)
    D = args.latent_dim or base.latent_dim
    if pair == "mmvaeplus": kw = dict(latent_dim=max(1, D // 2), private_dim=max(1, D - D // 2))
    else: kw = dict(latent_dim=D, private_dim=0)
    kl = "subset_average" if pair == "mopoe" else "auto"
    return resolve_config(dataset=args.dataset, source=args.source, objective=P.MOPOE_OBJECTIVE[pair], kl=kl, seed=seed,
                          data_dir=args.data_dir, batch_size=args.batch_size or base.batch_size,
                          **opts, **kw)


def build_pair(args, pair: str, M: int, info, seed: int = 0):
    "(cfg, mopoe model, MultiVae model) with the same initial weights."
    import torch

    from mopoe.train import build_model
    cfg = resolve(args, pair, M, seed)
    torch.manual_seed(seed)
    model = build_model(cfg, info)
    mv = P.multivae_from(pair, model, cfg.beta) if pair != "mopoe_auto" else None
    if mv is not None and not P.same_weights(model, mv):
        raise RuntimeError(f"{pair}: the MultiVae copy differs from mopoe's modules")
    return cfg, model, mv


def fixed_batches(train, n: int, B: int, M: int, rate: float, seed: int):
    "n batches of B tuples (the first n*B of a seeded permutation), with rate > 0 their masks; missing entries zeroed."
    import torch
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[: n * B]
    out = []
    for i in range(n):
        x, _ = train[idx[i * B:(i + 1) * B]]
        obs = P.make_missing(B, M, rate, seed + 1000 + i) if rate > 0 else None
        out.append((P.zero_missing(x, obs, list(x)), obs))
    return out


# ---------------------------------------------------------------------------------------------------------------
# printing

class Report:
    "Prints markdown and keeps it (and the JSON results) for the files."
    def __init__(self, args):
        self.args, self.lines, self.res = args, [], {}

    def say(self, text=""):
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header, rows):
        self.say("| " + " | ".join(header) + " |")
        self.say("|" + "---|" * len(header))
        for r in rows: self.say("| " + " | ".join(str(c) for c in r) + " |")
        self.say()

    def save(self):
        if self.args.json:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
            with open(self.args.json + ".tmp", "w") as f: json.dump(self.res, f, indent=1, default=str)
            os.replace(self.args.json + ".tmp", self.args.json)
        if self.args.md:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.md)), exist_ok=True)
            with open(self.args.md + ".tmp", "w") as f: f.write("\n".join(self.lines) + "\n")
            os.replace(self.args.md + ".tmp", self.args.md)


def fmt(v, d=4):
    if v is None or (isinstance(v, float) and math.isnan(v)): return "–"
    if isinstance(v, float): return f"{v:.{d}g}" if abs(v) < 1e4 else f"{v:,.1f}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------------
# 1. the equal-loss check

def stage_check(args, rep: Report) -> bool:
    out = []
    for M in args.check_modalities:
        train, _, info = load_data(args, M, min(args.num_train, 1024), min(args.num_test, 64))
        for pair in [p for p in args.pairs if p != "mmvae"]:
            for masked in (False, True):
                if pair == "mvae" and masked: continue
                cfg, model, mv = build_pair(args, pair, M, info, seed=0)
                if why := P.not_comparable(pair, model, masked):
                    out.append({"pair": pair, "M": M, "masked": masked, "skipped": why})
                    continue
                (x, obs), = fixed_batches(train, 1, cfg.batch_size, M, args.missing_rate if masked else 0.0, seed=7)
                t = time.perf_counter()
                r = P.check_pair(pair, model, mv, x, obs, cfg.beta, seed=11)
                r.update(seconds=time.perf_counter() - t, ok=P.tolerance_ok(r))
                out.append(r)
                print(f"   [check M={M} {pair} {'masked' if masked else 'complete'}: rel. diff {r['rel_diff']:.1e}]",
                      flush=True)
                del model, mv; gc.collect()
    ok_all = all(r["ok"] for r in out if "skipped" not in r)
    rep.res["check"] = {"rows": out, "passed": ok_all, "tolerance": {"rel": 1e-5, "grad": 1e-3}}
    render_check(rep)
    return ok_all


def render_check(rep: Report):
    res, st = rep.res["check"], rep.res["settings"]
    rep.say("## 1. Equal loss on the same batch, given the same draws (before anything is timed)")
    rep.say()
    rep.say("Per example, float32, one batch of the training set, same initial weights. MoPoE: MultiVae's own "
            "row-to-subset assignment handed to mopoe's objective (`ids`), mopoe with the exact subset-average KL "
            "(MultiVae's); MVAE: the same seed; MMVAE+: MultiVae's own Laplace noise handed to mopoe (`noise`). "
            "Masked rows: the same masks in both (each modality missing with probability "
            f"{st['missing_rate']}, at least one kept). Gradient gap: max |g_mopoe − g_MultiVae| over all network "
            "parameters / max |g_mopoe|. 'mopoe, own draw': mopoe's loss with its own stratified assignment (an "
            "unforced step).")
    rep.say()
    rows, skipped = [], []
    for r in res["rows"]:
        if "skipped" in r:
            skipped.append(f"M = {r['M']}, {r['pair']}, {'masked' if r['masked'] else 'complete'}: {r['skipped']}")
            continue
        rps, masked = r.get("rows_per_subset"), r["masked"]
        blocks = (f"{rps['min']}–{rps['max']} (full set {rps['full_set']}; Eq. 6: {rps['eq6_expected']:.2f})"
                  if rps and not masked else ("random among available" if rps else "–"))
        rows.append([r["M"], r["pair"], "masked" if masked else "complete", f"{r['mopoe']:.3f}", f"{r['multivae']:.3f}",
                     f"{r['abs_diff']:.2g}", f"{r['rel_diff']:.1e}", f"{r['grad_rel_gap']:.1e}", blocks,
                     f"{r['mopoe_own_draw']:.3f}", "equal" if r["ok"] else "**DIFFERENT**"])
    rep.table(["M", "pair", "data", "mopoe loss", "MultiVae loss", "|Δ|", "rel. Δ", "grad gap",
               "MultiVae rows per subset", "mopoe, own draw", "verdict"], rows)
    rep.say("Not checked: MMVAE – " + P.ESTIMATOR_NOTES["mmvae"])
    rep.say("MVAE – " + P.ESTIMATOR_NOTES["mvae"].split(". ", 1)[1])
    for line in skipped: rep.say(f"Not checked nor timed here: {line}.")
    rep.say()
    tol = res["tolerance"]
    e = lambda x: f"{x:.0e}".replace("e-0", "e-")
    rep.say(f"**Check: {'passed' if res['passed'] else 'FAILED'}** (tolerance: rel. Δ ≤ {e(tol['rel'])}, gradient gap "
            f"≤ {e(tol['grad'])}).")
    rep.say()


# ---------------------------------------------------------------------------------------------------------------
# 2. step time

class Stepper:
    "One model's training step on cycled batches with its own Adam and its own random stream."
    def __init__(self, loss_fn, params, lr, batches, seed):
        import torch
        self.loss_fn, self.batches, self.i = loss_fn, batches, 0
        self.opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(seed)
        self.rng = g.get_state()

    def __call__(self, batch=None):
        import torch
        x, obs = self.batches[self.i % len(self.batches)] if batch is None else batch
        self.i += 1
        keep = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x, obs)
        loss.backward()
        self.opt.step()
        self.rng = torch.get_rng_state()
        torch.set_rng_state(keep)
        return loss.detach()


def mopoe_loss_fn(model, beta):
    return lambda x, obs: model.loss(x, beta=beta, observed=obs)[0]


def multivae_loss_fn(pair, mv, names):
    return lambda x, obs: P.multivae_loss(pair, mv, x, obs, names)


def interleaved(fns: dict, rounds: int, steps: int, round_seconds: float = 0.0) -> tuple:
    "Seconds per step of each closure: a warm-up step each, then `rounds` rounds (order rotated, reversed every other)."
    n_steps = {}
    for n, f in fns.items():
        t = time.perf_counter(); f()
        n_steps[n] = max(steps, int(round_seconds / max(time.perf_counter() - t, 1e-6)))
    names, per = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2: order = order[::-1]
        for n in order:
            gc.collect()
            t = time.perf_counter()
            for _ in range(n_steps[n]): fns[n]()
            per[n].append((time.perf_counter() - t) / n_steps[n])
    return per, n_steps


SPEED_LABEL = {"mopoe": "MoPoE (mopoe exact KL)", "mopoe_auto": "MoPoE (mopoe default kl=auto)", "mvae": "MVAE",
               "mmvaeplus": "MMVAE+", "mmvae": "MMVAE"}


def stage_speed(args, rep: Report):
    out = []
    for M in args.speed_modalities:
        train, _, info = load_data(args, M, min(args.num_train, 1024), min(args.num_test, 64))
        for masked in (False, True):
            fns, meta = {}, {}
            for pair in args.pairs + (["mopoe_auto"] if "mopoe" in args.pairs and M > 5 else []):
                if pair == "mvae" and masked: continue
                if pair == "mmvae" and masked: continue
                cfg, model, mv = build_pair(args, pair, M, info, seed=0)
                if pair != "mmvae" and P.not_comparable(pair, model, masked): continue
                rate = args.missing_rate if masked else 0.0
                batches = fixed_batches(train, args.speed_batches, cfg.batch_size, M, rate, seed=5)
                fns[(pair, "mopoe")] = Stepper(mopoe_loss_fn(model, cfg.beta), model.parameters(), cfg.lr, batches, 1)
                if mv is not None:
                    fns[(pair, "multivae")] = Stepper(multivae_loss_fn(pair, mv, list(model.modalities)),
                                                      mv.parameters(), cfg.lr, batches, 1)
                meta[pair] = dict(batch=cfg.batch_size, latent=cfg.latent_dim, private=cfg.private_dim)
            t0 = time.perf_counter()
            load = list(os.getloadavg())
            per, n_steps = interleaved(fns, args.rounds, args.steps_per_round, args.round_seconds)
            wall = time.perf_counter() - t0
            med = {k: statistics.median(v) for k, v in per.items()}
            setting = "masked" if masked else "complete"
            for pair in meta:
                other = ("mopoe", "multivae") if pair == "mopoe_auto" else (pair, "multivae")
                a, b = med[(pair, "mopoe")], med.get(other)
                rr = None if b is None else statistics.median(
                    y / x for x, y in zip(per[(pair, "mopoe")], per[other], strict=True))
                out.append({"M": M, "setting": setting, "pair": pair, **meta[pair], "mopoe_ms": 1e3 * a,
                            "multivae_ms": None if b is None else 1e3 * b,
                            "ratio_of_medians": None if b is None else b / a, "median_of_round_ratios": rr,
                            "rounds_s": {"mopoe": per[(pair, "mopoe")], "multivae": per.get((pair, "multivae"))},
                            "steps_per_round": {"mopoe": n_steps[(pair, "mopoe")],
                                                "multivae": n_steps.get((pair, "multivae"))},
                            "loadavg_before": load})
            rep.res.setdefault("speed_wall_s", {})[f"{M}_{setting}"] = wall
            print(f"   [M={M} {setting}: {wall:.0f} s]", flush=True)
            del fns; gc.collect()
        rep.res["speed"] = out
        rep.save()
    rep.res["speed"] = out
    render_speed(rep)


def render_speed(rep: Report):
    st = rep.res["settings"]
    rep.say("## 2. Step time, interleaved in one process")
    rep.say()
    rep.say("One training step = zero_grad + loss + backward + Adam step; "
            f"{st['rounds']} rounds of ≥ {st['steps_per_round']} step(s) (≈ {st.get('round_seconds', 0):g} s a "
            "contestant, from its warm-up step) after one warm-up step each, every contestant of a setting in each "
            f"round (order rotated and reversed every other round), {st['speed_batches']} batches cycled in the same "
            "order for all; median ms/step; ratio = MultiVae / mopoe: of the medians, and the median of the per-round "
            "ratios. 'mopoe exact KL' is the loss-checked pair (the work MultiVae does); 'mopoe default' is kl=auto "
            f"(sampled KL above 31 subsets). Masked: each modality missing with probability {st['missing_rate']}.")
    rep.say()
    rows, apart = [], []
    for r in rep.res["speed"]:
        b = r["multivae_ms"]
        cells = [r["M"], r["setting"], SPEED_LABEL[r["pair"]], f"{r['mopoe_ms']:.0f}", "–" if b is None else f"{b:.0f}",
                 "–" if b is None else f"{r['ratio_of_medians']:.2f}×",
                 "–" if r["median_of_round_ratios"] is None else f"{r['median_of_round_ratios']:.2f}×"]
        (apart if r["pair"] == "mmvae" else rows).append(cells)
    hdr = ["M", "data", "objective", "mopoe ms/step", "MultiVae ms/step", "MultiVae / mopoe (medians)",
           "MultiVae / mopoe (median of rounds)"]
    rep.table(hdr, rows)
    if apart:
        why = P.ESTIMATOR_NOTES["mmvae"].split(": ", 1)[1].split(". No")[0]
        rep.say(f"Different work, not a speed ratio ({why}):")
        rep.say()
        rep.table(hdr, apart)


# ---------------------------------------------------------------------------------------------------------------
# 3. quality after N steps

def train_pair(args, M, seed, train, info, rep):
    "Train mopoe's and MultiVae's MoPoE from the same initial weights on the same batches, interleaved step by step."
    import torch
    cfg, model, mv = build_pair(args, "mopoe", M, info, seed=seed)
    names = list(model.modalities)
    B, N = cfg.batch_size, args.steps
    obs_all = P.make_missing(len(train), M, args.quality_missing_rate, seed) if args.quality_missing_rate > 0 else None
    a = Stepper(mopoe_loss_fn(model, cfg.beta), model.parameters(), cfg.lr, None, seed=seed + 100)
    b = Stepper(multivae_loss_fn("mopoe", mv, names), mv.parameters(), cfg.lr, None, seed=seed + 200)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // B
    hist = {"mopoe": [], "multivae": []}
    ta = tb = 0.0
    run_a = run_b = 0.0
    n_in = 0
    step = 0
    while step < N:
        perm = torch.randperm(len(train), generator=g)
        for i in range(per_epoch):
            if step >= N: break
            idx = perm[i * B:(i + 1) * B]
            x, _ = train[idx]
            obs = None if obs_all is None else obs_all[idx]
            batch = (P.zero_missing(x, obs, names), obs)
            t = time.perf_counter(); la = a(batch); ta += time.perf_counter() - t
            t = time.perf_counter(); lb = b(batch); tb += time.perf_counter() - t
            run_a += float(la); run_b += float(lb); n_in += 1
            step += 1
            if n_in == per_epoch or step == N:
                hist["mopoe"].append(run_a / n_in); hist["multivae"].append(run_b / n_in)
                print(f"   seed {seed} step {step}/{N}: training loss mopoe {run_a / n_in:.2f}, "
                      f"MultiVae {run_b / n_in:.2f} "
                      f"({1e3 * ta / step:.0f} / {1e3 * tb / step:.0f} ms a step)", flush=True)
                run_a = run_b = 0.0; n_in = 0
    return cfg, model, mv, hist, {"mopoe_ms": 1e3 * ta / N, "multivae_ms": 1e3 * tb / N}


def summarize(res: dict, M: int, fid: bool) -> dict:
    "The scalar metrics of one evaluate() result."
    out = {}
    coh = res.get("coherence", {})
    for k in range(1, M):
        out[f"coherence_{k}"] = coh.get("by_size", {}).get("excl_target", {}).get(str(k))
    out["joint_coherence"] = coh.get("joint")
    for k in range(1, M + 1):
        out[f"latent_{k}"] = res.get("latent", {}).get("by_size", {}).get(str(k))
    ll = res.get("loglik", {})
    out["loglik_X"] = ll.get("X")
    out["loglik_one_input"] = ll.get("by_size", {}).get("1")
    if fid and "fid" in res:
        f = res["fid"]
        unc = f.get("unconditional", {})
        vals = [v.get("fid") if isinstance(v, dict) else v for v in unc.values()]
        vals = [v for v in vals if isinstance(v, (int, float))]
        out["fid_prior_mean"] = sum(vals) / len(vals) if vals else None
    return out


def welch(a: list, b: list):
    "Welch's t-test p-value (scipy), None with fewer than 2 values a side or no spread."
    if len(a) < 2 or len(b) < 2: return None
    import warnings

    from scipy import stats
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0: return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # nearly identical samples: scipy's precision warning
        return float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def ms(v: list) -> str:
    "mean ± s.d. (the mean alone for one value): 3 decimals below 2 in size, 1 below 100, none above."
    if not v: return "–"
    m = statistics.fmean(v)
    big = max(abs(x) for x in v)
    f = (lambda x: f"{x:.3f}") if big < 2 else (lambda x: f"{x:.1f}") if big < 100 else (lambda x: f"{x:,.0f}")
    return f(m) if len(v) == 1 else f"{f(m)} ± {f(statistics.stdev(v))}"


def holm(pvalues: list) -> list:
    "Holm's step-down adjustment of p-values (None stays None)."
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out, run, m = [None] * len(pvalues), 0.0, len(idx)
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (m - rank) * pvalues[i]))
        out[i] = run
    return out


QUALITY_LABELS = dict(joint_coherence="joint coherence", loglik_X="log p(X) (nats; proposal q(z|X))",
                      loglik_one_input="log p(X), proposal from one input (mean)",
                      fid_prior_mean="prior FID (mean over modalities)")


def quality_table(q: dict) -> list:
    "Per metric: both libraries' values over the seeds, the paired differences, Welch's p, Holm's p, the verdict."
    per_seed = q["per_seed"]
    rows = []
    for k in per_seed[0]["mopoe"]["summary"]:
        a = [s["mopoe"]["summary"][k] for s in per_seed if s["mopoe"]["summary"][k] is not None]
        b = [s["multivae"]["summary"][k] for s in per_seed if s["multivae"]["summary"][k] is not None]
        if not a or not b: continue
        rows.append({"metric": k, "mopoe": a, "multivae": b, "diff": [y - x for x, y in zip(a, b, strict=False)],
                     "welch_p": welch(a, b)})
    for r, ph in zip(rows, holm([r["welch_p"] for r in rows]), strict=True):
        r["holm_p"] = ph
        if min(len(r["mopoe"]), len(r["multivae"])) < 2: r["verdict"] = "no test (1 seed): no lead"
        elif ph is not None and ph < 0.05:
            r["verdict"] = f"lead: {'MultiVae' if statistics.fmean(r['diff']) > 0 else 'mopoe'}"
        elif r["welch_p"] is not None and r["welch_p"] < 0.05: r["verdict"] = "no lead (p < 0.05 only before Holm)"
        else: r["verdict"] = "no lead"
    return rows


def stage_quality(args, rep: Report):
    from mopoe.evaluate import train_classifiers
    from mopoe.metric import evaluate
    M = args.quality_modalities
    train, test, info = load_data(args, M, args.num_train, args.num_test)
    clf = train_classifiers(train, info, epochs=args.classifier_epochs,
                            cache_dir=os.path.join(args.data_dir, "classifiers"),
                            seed=0, test_ds=test, progress=False, max_train=None if not args.smoke else args.num_train)
    metrics = "latent,coherence,loglik" + (",fid" if args.fid else "")
    per_seed = []
    q = {"M": M, "steps": args.steps, "seeds": args.seeds, "batch_size": resolve(args, "mopoe", M).batch_size,
         "per_seed": per_seed, "classifier_scores": clf.scores, "metrics": metrics,
         "missing_rate": args.quality_missing_rate}
    for seed in args.seeds:
        t0, c0 = time.perf_counter(), cpu_seconds()
        cfg, model, mv, hist, speed = train_pair(args, M, seed, train, info, rep)
        t_train = time.perf_counter() - t0
        scored = {}
        for lib, m in (("mopoe", model.eval()), ("multivae", P.mopoe_view("mopoe", mv, model))):
            r = evaluate(m, train, test, info, clf, metrics=metrics, max_test=args.eval_max_test, seed=seed,
                         loglik_max_test=args.loglik_max_test, num_latent_train=args.num_latent_train, progress=False)
            scored[lib] = {"summary": summarize(r, M, args.fid), "n": r.get("n"), "time": r.get("time")}
        per_seed.append({"seed": seed, "train_seconds": t_train, "cpu_seconds": cpu_seconds() - c0,
                         "wall_seconds": time.perf_counter() - t0, "step_ms_in_training": speed, **scored,
                         "training_loss_by_epoch": hist})
        rep.res["quality"] = q
        rep.save()
        del model, mv; gc.collect()
    q["table"] = quality_table(q)
    render_quality(rep)


def render_quality(rep: Report):
    q = rep.res["quality"]
    M, per_seed = q["M"], q["per_seed"]
    rows = quality_table(q)
    q["table"] = rows
    B = q.get("batch_size") or next((r["batch"] for r in rep.res.get("speed", []) if r["M"] == M), "?")
    missing = f", missing rate {q['missing_rate']}" if q.get("missing_rate") else ", complete data"
    rep.say(f"## 3. Quality after {q['steps']} steps (MoPoE, M = {M}"
            f"{missing})")
    rep.say()
    scores = ", ".join(f"{m} {v:.2f}" for m, v in (q.get("classifier_scores") or {}).items())
    rep.say(f"{len(per_seed)} seed(s) {[s['seed'] for s in per_seed]}; each seed: both models from the same initial "
            f"weights (mopoe's `build_model` at that seed), the same {q['steps']} batches of {B} in the same order, "
            f"Adam; scored by `mopoe.metric.evaluate` with the same classifiers (test accuracy {scores}), the same "
            "evaluation seed; coherence = targets outside the inputs. Δ = MultiVae − mopoe (per seed, paired), "
            "mean ± s.d. over seeds; Welch's t-test on the two samples, and Holm's adjustment over the "
            f"{sum(r['welch_p'] is not None for r in rows)} tests of the table; a lead needs ≥ 2 seeds a side and "
            "Holm-adjusted p < 0.05.")
    rep.say()
    lab = {f"coherence_{k}": f"coherence, {k} input{'s' if k > 1 else ''}" for k in range(1, M)}
    lab.update({f"latent_{k}": f"latent classification, {k} input{'s' if k > 1 else ''}" for k in range(1, M + 1)})
    lab.update(QUALITY_LABELS)
    p2 = lambda p: "–" if p is None else f"{p:.2g}"
    rep.table(["metric", "mopoe", "MultiVae", "Δ (MultiVae − mopoe)", "Welch p", "Holm p", "verdict"],
              [[lab.get(r["metric"], r["metric"]), ms(r["mopoe"]), ms(r["multivae"]), ms(r["diff"]), p2(r["welch_p"]),
                p2(r["holm_p"]), r["verdict"]] for r in rows])
    hists = [s["training_loss_by_epoch"] for s in per_seed]
    gaps = [[y - x for x, y in zip(h["mopoe"], h["multivae"], strict=True)] for h in hists]
    rep.say("Reported training loss of the last epoch (nats a tuple, each library's own estimator): "
            f"mopoe {ms([h['mopoe'][-1] for h in hists])}, MultiVae {ms([h['multivae'][-1] for h in hists])}; "
            f"MultiVae − mopoe by epoch, over seeds: {min(min(g) for g in gaps):.1f} to "
            f"{max(max(g) for g in gaps):.1f}.")
    tr = [s["step_ms_in_training"] for s in per_seed]
    rep.say("Step time inside the training loop (interleaved step by step): "
            f"mopoe {ms([t['mopoe_ms'] for t in tr])} ms, MultiVae {ms([t['multivae_ms'] for t in tr])} ms.")
    rep.say()


# ---------------------------------------------------------------------------------------------------------------

def render_header(rep: Report, rendered: bool = False):
    res = rep.res
    v, mch, st = res["versions"], res["machine"], res["settings"]
    rep.say(f"# mopoe beside MultiVae on identical networks{' (smoke run)' if st.get('smoke') else ''}")
    rep.say()
    rep.say(f"`{res['command']}`" + (" (tables rendered from its JSON by `--render`)" if rendered else ""))
    rep.say()
    rep.say(f"mopoe {v['mopoe']} ({v.get('mopoe_commit')}), MultiVae {v['multivae']} (pythae {v.get('pythae')}), torch "
            f"{v['torch']}; {mch['cpu']}, {mch['logical_cpus']} logical CPUs, {st['threads']} thread(s) "
            f"(OMP_NUM_THREADS={mch['OMP_NUM_THREADS']}), no GPU; load average at the start "
            f"{', '.join(f'{x:.1f}' for x in mch['loadavg_start'])}. Dataset {st['dataset']} ({st['source']}).")
    rep.say()


def render_summary(rep: Report):
    "Speed ratio and quality difference side by side, for the quality stage's M."
    q, speed = rep.res.get("quality") or {}, rep.res.get("speed") or []
    if not q.get("per_seed"): return
    M = q["M"]
    rows = {r["metric"]: r for r in q.get("table") or quality_table(q)}
    sp = {(r["setting"], r["pair"]): r for r in speed if r["M"] == M}
    rep.say(f"## Side by side (MoPoE, M = {M})")
    rep.say()
    cells = []
    for setting in ("complete", "masked"):
        r = sp.get((setting, "mopoe"))
        if r: cells.append(f"{setting} {r['ratio_of_medians']:.2f}× / {r['median_of_round_ratios']:.2f}×")
    if cells: rep.say(f"- Step time, MultiVae / mopoe (same loss; medians / median of rounds): {'; '.join(cells)}.")
    coh = [rows[f"coherence_{k}"] for k in range(1, M) if f"coherence_{k}" in rows]
    lat = [rows[f"latent_{k}"] for k in range(1, M + 1) if f"latent_{k}" in rows]
    d = lambda r: f"{statistics.fmean(r['diff']):+.3f}"
    lead = lambda rs: "no lead" if all(x["verdict"].startswith("no") for x in rs) else "; ".join(
        f"{x['metric']}: {x['verdict']}" for x in rs if not x["verdict"].startswith("no"))
    n = len(q["per_seed"])
    if coh: rep.say(f"- Coherence by 1–{M - 1} inputs, MultiVae − mopoe ({n} seeds, {q['steps']} steps): "
                    f"{' / '.join(d(r) for r in coh)} – {lead(coh)}.")
    if lat: rep.say(f"- Latent classification by 1–{M} inputs, MultiVae − mopoe: {' / '.join(d(r) for r in lat)} – "
                    f"{lead(lat)}.")
    if "loglik_X" in rows:
        r = rows["loglik_X"]
        rep.say(f"- log p(X), MultiVae − mopoe: {statistics.fmean(r['diff']):+.1f} nats – {lead([r])}.")
    rep.say()


def render_footer(rep: Report):
    res = rep.res
    cpu = res["cpu_seconds"]
    rep.say(f"CPU time of this process: {cpu['total'] / 60:.1f} min "
            f"({', '.join(f'{k} {v / 60:.1f}' for k, v in cpu.items() if k != 'total')}); wall "
            f"{res['wall_seconds'] / 60:.1f} min; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in res['machine']['loadavg_end'])}.")


def render(path: str, md: str | None, out_json: str | None = None) -> int:
    """Print (with `md`: write) the markdown of a results JSON this script wrote; with `out_json` also its derived
    tables."""
    with open(path) as f: res = json.load(f)
    rep = Report(argparse.Namespace(json=out_json, md=md))
    rep.res = res
    render_header(rep, rendered=True)
    if "check" in res: render_check(rep)
    if res.get("speed"): render_speed(rep)
    if res.get("quality", {}).get("per_seed"): render_quality(rep)
    render_summary(rep)
    if "total" in res.get("cpu_seconds", {}): render_footer(rep)
    rep.save()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render: return render(args.render, args.md, args.json)
    P.require_multivae()
    import torch
    torch.set_num_threads(args.threads)
    if args.dataset != "polymnist":                    # a fixed number of modalities: the dataset's own
        n = len(load_data(args, None, min(args.num_train, 1024), min(args.num_test, 64))[2].modalities)
        args.speed_modalities, args.check_modalities, args.quality_modalities = [n], [n], n
    t0, c0 = time.perf_counter(), cpu_seconds()
    rep = Report(args)
    cmd = "python benchmarks/peers/multivae_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rep.res.update(command=cmd, versions=versions(), machine=machine_info(args.threads),
                   settings={k: v for k, v in vars(args).items() if k not in ("json", "md", "render")},
                   estimator_notes=P.ESTIMATOR_NOTES)
    render_header(rep)
    ok = stage_check(args, rep)
    rep.res["cpu_seconds"] = {"check": cpu_seconds() - c0}
    rep.save()
    if not ok and not args.no_abort:
        rep.say("The two libraries do not compute the same loss: nothing is timed (--no-abort to time anyway).")
        rep.save()
        return 1
    if "speed" in args.stages:
        c = cpu_seconds()
        stage_speed(args, rep)
        rep.res["cpu_seconds"]["speed"] = cpu_seconds() - c
        rep.save()
    if "quality" in args.stages:
        c = cpu_seconds()
        stage_quality(args, rep)
        rep.res["cpu_seconds"]["quality"] = cpu_seconds() - c
        rep.save()
    rep.res["cpu_seconds"]["total"] = cpu_seconds() - c0
    rep.res["wall_seconds"] = time.perf_counter() - t0
    rep.res["machine"]["loadavg_end"] = list(os.getloadavg())
    render_summary(rep)
    render_footer(rep)
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
