"""The training loop's own cost per step: a bare PyTorch loop beside `mopoe.learner.Learner` with every default callback,
on the same model and batches, interleaved in one process.

Two settings: a tiny linear model (the step costs almost nothing, so what is left is the loop's bookkeeping, in µs) and
the main job's MoPoE (MNIST-SVHN-Text, the `cpu` preset's networks and batch size, random tuples), where that
bookkeeping is to be set against a real step. The Learner arm runs KLSchedule, NaNCheck, the JSON-lines logger and a
disabled progress bar – what `mopoe.train` adds to every step except the checkpoint of an epoch's end.
"""
import argparse
import json
import os
import platform
import statistics
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


def time_arms(model, loss_fn, batches, steps: int, rounds: int, beta: float = 1.0) -> dict:
    "Seconds per step of each arm in every round (the arms alternate; the first round of each is a warm-up)."
    cfg = SimpleNamespace(beta=beta, beta_warmup=0)
    out = {"bare": [], "learner": []}
    folder = tempfile.mkdtemp()
    for r in range(rounds + 1):
        for arm in (("bare", "learner") if r % 2 == 0 else ("learner", "bare")):
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            t = time.perf_counter()
            if arm == "bare":
                for x, obs in batches(0):
                    loss, logs = loss_fn(x, obs, beta)
                    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            else:
                cbs = [KLSchedule(), NaNCheck(50), Progress(50, enabled=False), JSONLLogger(folder)]
                Learner(model, opt, loss_fn, batches, steps, 1, cbs, config=cfg).fit()
                os.remove(os.path.join(folder, "metrics.jsonl"))
            if r: out[arm].append((time.perf_counter() - t) / steps)
    return out


def summary(times: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds_per_step": times, "median_s": med, "overhead_us_per_step": (med["learner"] - med["bare"]) * 1e6,
            "ratio": med["learner"] / med["bare"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tiny-steps", type=int, default=400)
    p.add_argument("--main-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="the main job's batch size (default: the cpu preset's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2 rounds, 20 tiny steps, 2 main-job steps of batch 8")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.quick: a.rounds, a.tiny_steps, a.main_steps, a.batch = 2, 20, 2, 8
    return a


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load = time.time(), [os.getloadavg()[0]]
    tiny = summary(time_arms(*tiny_setting(args.tiny_steps, 64), args.tiny_steps, args.rounds))
    load.append(os.getloadavg()[0])
    model, loss_fn, batches, beta = main_job_setting(args.main_steps, args.batch)
    main_job = summary(time_arms(model, loss_fn, batches, args.main_steps, args.rounds, beta))
    load.append(os.getloadavg()[0])
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads,
           "settings": vars(args), "tiny": tiny, "main_job": main_job, "load_average": load, "wall_seconds": time.time() - t0}
    for name, r in (("tiny linear model", tiny), ("main job (MoPoE, MNIST-SVHN-Text, cpu preset)", main_job)):
        m = r["median_s"]
        print(f"{name}: bare {m['bare'] * 1e3:.3f} ms/step, Learner {m['learner'] * 1e3:.3f} ms/step, "
              f"overhead {r['overhead_us_per_step']:.0f} µs/step, ratio {r['ratio']:.3f}")
    print(f"load average: {', '.join(f'{x:.1f}' for x in load)}")
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
