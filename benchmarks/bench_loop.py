"""The training loop's own cost per step: a bare PyTorch loop beside `mopoe.learner.Learner` with every default
callback, on the same model and batches, interleaved in one process.

With `--ab REV` a third arm runs the loop of an earlier revision (its `mopoe/learner.py`, taken with `git show`, which
then held the loop, its callbacks and the loggers in one module) on the same model and batches, in the same rounds.

Two settings: a tiny linear model (the step costs almost nothing, so what is left is the loop's bookkeeping, in µs) and
the main job's MoPoE (MNIST-SVHN-Text, the `cpu` preset's networks and batch size, random tuples), where that
bookkeeping is to be set against a real step. The Learner arm runs KLSchedule, NaNCheck, the JSON-lines logger and a
disabled progress bar – what `mopoe.train` adds to every step except the checkpoint of an epoch's end.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from mopoe.learner import KLSchedule, Learner, NaNCheck, Progress
from mopoe.loggers import JSONLLogger

def tiny_setting(steps: int, batch: int):
    "A linear model on random vectors: (model, loss_fn, batches)."
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    X = torch.randn(batch * steps, 8)
    def loss_fn(x, obs, beta):
        loss = (net(x["a"]) ** 2).mean()
        return loss, {"loss": loss.detach(), "rec": loss.detach(), "kl": loss.detach() * 0}
    return net, loss_fn, lambda epoch: (({"a": X[i:i + batch]}, None) for i in range(0, len(X), batch))


def main_job_setting(steps: int, batch: int | None):
    "The main job's model (MoPoE on MNIST-SVHN-Text, cpu preset) on random tuples of the data's shapes and types."
    from mopoe.data import get_datasets
    from mopoe.train import build_model, resolve_config
    cfg = resolve_config(dataset="mnist_svhn_text", device="cpu", batch_size=batch)
    _, test, info = get_datasets("mnist_svhn_text", root=tempfile.mkdtemp(), num_train=64, num_test=cfg.batch_size,
                                 source="offline")
    torch.manual_seed(0)
    model = build_model(cfg, info)
    x, _ = test[torch.arange(cfg.batch_size)]
    def loss_fn(x, obs, beta): return model(x, beta=beta)
    return model, loss_fn, lambda epoch: ((x, None) for _ in range(steps)), cfg.beta


def old_learner(rev: str):
    "The module mopoe/learner.py of git revision `rev` (the loop, its callbacks and loggers) under another name."
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:mopoe/learner.py"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "learner_old.py")
    with open(path, "w") as f: f.write(src)
    spec = importlib.util.spec_from_file_location("learner_old", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _learner_arm(mod, loggers, model, opt, loss_fn, batches, steps, cfg, folder):
    cbs = [mod.KLSchedule(), mod.NaNCheck(50), mod.Progress(50, enabled=False), loggers.JSONLLogger(folder)]
    mod.Learner(model, opt, loss_fn, batches, steps, 1, cbs, config=cfg).fit()
    os.remove(os.path.join(folder, "metrics.jsonl"))


def time_arms(model, loss_fn, batches, steps: int, rounds: int, beta: float = 1.0, old=None) -> dict:
    "Seconds per step of each arm in every round (the order rotates each round; the first round is a warm-up)."
    cfg = SimpleNamespace(beta=beta, beta_warmup=0)
    now = SimpleNamespace(KLSchedule=KLSchedule, NaNCheck=NaNCheck, Progress=Progress, Learner=Learner)
    arms = {"bare": None, "learner": (now, SimpleNamespace(JSONLLogger=JSONLLogger))}
    if old is not None: arms["learner_old"] = (old, old)
    out, names, folder = {k: [] for k in arms}, list(arms), tempfile.mkdtemp()
    for r in range(rounds + 1):
        for arm in names[r % len(names):] + names[:r % len(names)]:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            t = time.perf_counter()
            if arm == "bare":
                for x, obs in batches(0):
                    loss, logs = loss_fn(x, obs, beta)
                    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            else: _learner_arm(*arms[arm], model, opt, loss_fn, batches, steps, cfg, folder)
            if r: out[arm].append((time.perf_counter() - t) / steps)
    return out


def summary(times: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds_per_step": times, "median_s": med,
            "overhead_us_per_step": {k: (v - med["bare"]) * 1e6 for k, v in med.items() if k != "bare"},
            "ratio_to_bare": {k: v / med["bare"] for k, v in med.items() if k != "bare"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tiny-steps", type=int, default=400)
    p.add_argument("--main-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="the main job's batch size (default: the cpu preset's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ab", default=None, metavar="REV", help="also time the loop of this git revision (e.g. 595f7f1)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 2 rounds, 20 tiny steps, 2 main-job steps of batch 8")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.quick: a.rounds, a.tiny_steps, a.main_steps, a.batch = 2, 20, 2, 8
    return a


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load = time.time(), [os.getloadavg()[0]]
    old = old_learner(args.ab) if args.ab else None
    tiny = summary(time_arms(*tiny_setting(args.tiny_steps, 64), args.tiny_steps, args.rounds, old=old))
    load.append(os.getloadavg()[0])
    model, loss_fn, batches, beta = main_job_setting(args.main_steps, args.batch)
    main_job = summary(time_arms(model, loss_fn, batches, args.main_steps, args.rounds, beta, old=old))
    load.append(os.getloadavg()[0])
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads,
           "settings": vars(args), "tiny": tiny, "main_job": main_job, "load_average": load,
           "wall_seconds": time.time() - t0}
    for name, r in (("tiny linear model", tiny), ("main job (MoPoE, MNIST-SVHN-Text, cpu preset)", main_job)):
        m = r["median_s"]
        print(f"{name}: bare {m['bare'] * 1e3:.3f} ms/step; " + "; ".join(
            f"{k} {m[k] * 1e3:.3f} ms/step (+{r['overhead_us_per_step'][k]:.0f} µs, {r['ratio_to_bare'][k]:.3f}×)"
            for k in r["ratio_to_bare"]))
    print(f"load average: {', '.join(f'{x:.1f}' for x in load)}")
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
