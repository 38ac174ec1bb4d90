"""Why the faithful MVAE stays at chance on PolyMNIST: does the posterior collapse onto the prior expert, and what
causes it? Trains MVAE variants for a few hundred steps on the offline PolyMNIST (8,000 tuples, as the incomplete-data
grid) and prints, every `--every` steps, the KL of the joint posterior and the state of the encoders on a fixed probe
batch: the median log-variance of the unimodal experts and the share of (expert, latent unit) pairs that have switched
themselves off (log-variance > 10, precision < 5e-5: in a product with the prior expert such an expert contributes
nothing, and the gradient that could bring it back is scaled by its precision). Run from the repository root:

    python benchmarks/check_mvae_collapse.py [--steps 300] [--variants cpu warmup ...]
"""
import argparse
import json
import time

import torch

from mopoe.learner import kl_weight
from mopoe.train import batches, build_data, build_model, resolve_config, seed_everything

VARIANTS = {   # name -> (options, what it tests)
    "cpu": (dict(), "the grid's setting: cpu preset (latent 64, beta 1, batch 64, lr 1e-3), He-init encoders"),
    "paper_init": (dict(encoder_init="paper"), "the same with PyTorch's default init and ReLU (the paper's encoders)"),
    "prior_full": (dict(prior_expert="full"),
                   "the prior expert only in the full-set product, not in the unimodal ones"),
    "prior_none": (dict(prior_expert="none"), "no prior expert in any product"),
    "warmup": (dict(beta_warmup=1000), "KL weight rising from 0 to beta over 1,000 steps (Wu & Goodman's annealing)"),
    "missing_0.25": (dict(missing_rate=0.25),
                     "the grid's setting, each modality of a training tuple missing with probability 0.25"),
    "missing_0.75": (dict(missing_rate=0.75), "the same at missing rate 0.75"),
    "paper_setup": (dict(latent_dim=512, beta=2.5, batch_size=256, lr=5e-4, encoder_init="paper"),
                    "the paper's PolyMNIST hyperparameters (latent 512, beta 2.5, batch 256, lr 5e-4, paper encoders)"),
}


def probe(model, x):
    "Median expert log-variance and the share of (expert, unit) pairs switched off, on the probe batch."
    model.eval()
    with torch.no_grad(): _, lv, _, _ = model.experts(x)
    model.train()
    return lv.median().item(), (lv > 10).float().mean().item()


def check(name, steps, every, num_train, seed=0, data_dir="data"):
    options, what = VARIANTS[name]
    cfg = resolve_config(dataset="polymnist", preset="cpu", objective="mvae", num_train=num_train, num_test=256,
                         data_dir=data_dir, seed=seed, device="cpu", **options)
    train_ds, test_ds, info = build_data(cfg)
    seed_everything(seed)
    model = build_model(cfg, info)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_probe = test_ds[torch.arange(256)][0]
    print(f"\n{name}: {what} (prior expert {model.prior_expert!r})", flush=True)
    print(f"{'step':>6} {'KL (joint)':>11} {'median expert logvar':>21} {'switched off':>13}", flush=True)
    med, off = probe(model, x_probe)
    rows, step, t0 = [dict(step=0, kl=None, median_logvar=med, switched_off=off)], 0, time.time()
    print(f"{0:>6} {'':>11} {med:>21.2f} {off:>13.1%}", flush=True)
    while step < steps:
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed * 100003 + step))
        for batch in batches(train_ds, order, cfg.batch_size):
            beta = kl_weight(cfg, step)
            x, obs = batch[0], (batch[2] if len(batch) > 2 else None)   # (x, y) or (x, y, observed)
            loss, logs = model(x, beta=beta) if obs is None else model(x, observed=obs, beta=beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0 or step == steps:
                med, off = probe(model, x_probe)
                rows.append(dict(step=step, kl=float(logs["kl"]), median_logvar=med, switched_off=off))
                print(f"{step:>6} {rows[-1]['kl']:>11.3f} {med:>21.2f} {off:>13.1%}", flush=True)
            if step >= steps: break
    return dict(variant=name, what=what, options=options, rows=rows, seconds=round(time.time() - t0, 1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--num_train", type=int, default=8000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data_dir", default="data")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = [check(v, a.steps, a.every, a.num_train, data_dir=a.data_dir) for v in a.variants]
    if a.json:
        with open(a.json, "w") as f: json.dump(out, f, indent=1)
