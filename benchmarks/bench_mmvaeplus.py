"""MMVAE+'s training step next to MoPoE's on the PolyMNIST networks, and a short MMVAE+ training check (issue 20).

Step cost (default): the PolyMNIST encoders/decoders of `mopoe.nets.make_networks` (M modalities of 3x28x28,
Laplace likelihood of scale 0.75, beta 2.5), shared latent 32 + private 32, a batch of B tuples of synthetic
PolyMNIST-shaped tensors; one Adam training step (zero_grad + loss + backward + step) of each variant, interleaved
in one process (warm-up first), medians printed with the ratio to MoPoE:

- ``mopoe``: MoPoE-VAE (all 2^M - 1 subsets, the private latents' KL to N(0, I));
- ``mmvae``: MMVAE (the unimodal mixture, one sample per row), the same networks;
- ``mmvaeplus``: MMVAE+ with K = 1 (the authors' PolyMNIST setting): every modality decoded from every modality's z,
  M decoder calls of M*K*B rows – M^2 times the decoding work of the others;
- ``mmvaeplus_k4`` (``--variants``): the same with K = 4 (the IWAE/DReG settings scale with K).

Training check (``--train-steps N``; ``--train-objective mopoe`` for the same run with MoPoE): MMVAE+ (paper preset's
objective and optimiser: Laplace family, K = 1, beta 2.5, Adam with amsgrad at 1e-3, batch 128) for N steps on offline
PolyMNIST (num_train 2000, num_test 500); prints the loss every 25 steps, then the cross-modal coherence (for each
source m and target n != m: z ~ q(z|x_m), w_n ~ r_n, the decoded mean classified by a classifier trained on the target
modality), self-reconstruction coherence, and the linear latent classification on z, and mopoe.evaluate's conditional
coherence by number of inputs (the model's cond_generate: z from the inputs' unimodal mixture, a missing target's w from
r_n). Chance is 0.1.

Usage: python benchmarks/bench_mmvaeplus.py [--batch 128] [--repeats 5] [--variants mopoe mmvae mmvaeplus]
       python benchmarks/bench_mmvaeplus.py --train-steps 300 --data-dir /tmp/polymnist
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mopoe.likelihoods import get_likelihood
from mopoe.mmvaeplus import MMVAEPLUS_POLYMNIST_PAPER, MMVAEPlus, latent_scale, standard_noise
from mopoe.model import MultimodalVAE, default_rec_weights
from mopoe.nets import make_networks

VARIANTS = ("mopoe", "mmvae", "mmvaeplus", "mmvaeplus_k4")


def polymnist_info(M: int):
    "A stand-in DatasetInfo with M PolyMNIST-shaped modalities m0..m{M-1} (bench_objective's, beside this file)."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_objective", Path(__file__).with_name("bench_objective.py"))
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    return bench.polymnist_info(M)


def build(variant: str, info, latent: int = 32, private: int = 32, seed: int = 0, scale: float = 0.75):
    "The MultimodalVAE of `variant` on `info`'s networks (MMVAE+: its auxiliary priors set up)."
    torch.manual_seed(seed)
    enc, dec = make_networks(info, latent, private)
    liks = {m: get_likelihood("laplace", scale=scale) for m in info.modalities}
    objective = variant
    if variant.startswith("mmvaeplus"):
        K = 4 if variant == "mmvaeplus_k4" else 1
        objective = MMVAEPlus(K=K, estimator="elbo" if K == 1 else "iwae")
    model = MultimodalVAE(enc, dec, liks, latent, private, objective, rec_weights=default_rec_weights(info.data_dims),
                          shapes=info.shapes)
    if variant.startswith("mmvaeplus"): model.objective.setup(model)
    return model


def loss_of(model, x: dict, beta: float):
    "The model's training loss (its objective's `model_loss` through `MultimodalVAE.loss`)."
    return model.loss(x, beta=beta)


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    "Seconds per call of each fn, the variants interleaved round by round after `warmup` rounds."
    for _ in range(warmup):
        for f in fns.values(): f()
    out = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t = time.perf_counter(); f(); out[n].append(time.perf_counter() - t)
    return out


def bench(args):
    info = polymnist_info(args.modalities)
    torch.manual_seed(0)
    x = {m: torch.rand(args.batch, 3, 28, 28) for m in info.modalities}
    fns = {}
    for v in args.variants:
        model = build(v, info)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_of(model, x, 2.5)
            loss.backward()
            opt.step()
        fns[v] = step
    times = time_interleaved(fns, args.repeats)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}; "
          f"PolyMNIST networks, M={args.modalities}, batch {args.batch}, latent 32 + private 32, one Adam step, "
          f"{args.repeats} interleaved repeats after a warm-up")
    base = med.get("mopoe")
    for v in args.variants:
        ratio = f"  x{med[v] / base:.2f} MoPoE" if base else ""
        print(f"  {v:14s} median {med[v]:.3f} s  (min {min(times[v]):.3f}, max {max(times[v]):.3f}){ratio}")
    if args.json:
        with open(args.json, "w") as f: json.dump({"median_s": med, "times_s": times, "args": vars(args)}, f, indent=1)


@torch.no_grad()
def cross_coherence(model, classifiers, test_ds, info, batch: int = 250, seed: int = 0) -> dict:
    "Accuracy of the target's classifier on each source -> target generation (z ~ q(z|x_src), w ~ r_tgt; self: w ~ q)."
    obj, D, names = model.objective, model.latent_dim, model.modalities
    torch.manual_seed(seed)
    hits, n = {}, 0
    loader = torch.utils.data.DataLoader(test_ds, batch_size=batch)
    for x, y in loader:
        n += len(y)
        for s in names:
            mu, raw = model.encoders[s](x[s])
            z = mu[:, :D] + latent_scale(raw[:, :D], obj.family) * standard_noise(mu[:, :D].shape, obj.family, mu)
            w_self = mu[:, D:] + latent_scale(raw[:, D:], obj.family) * standard_noise(mu[:, D:].shape, obj.family, mu)
            for t in names:
                w = w_self if t == s else obj.private_prior_sample(model, t, (len(y),), mu)
                img = model.likelihoods[t].mean(model.decoders[t](torch.cat([z, w], -1)))
                pred = classifiers[t](img).argmax(-1)
                hits[(s, t)] = hits.get((s, t), 0) + (pred == y).sum().item()
    acc = {k: v / n for k, v in hits.items()}
    cross = [a for (s, t), a in acc.items() if s != t]
    selfs = [a for (s, t), a in acc.items() if s == t]
    return {"cross_mean": sum(cross) / len(cross), "cross_min": min(cross), "cross_max": max(cross),
            "self_mean": sum(selfs) / len(selfs), "pairs": {f"{s}->{t}": round(a, 3) for (s, t), a in acc.items()}}


def train_check(args):
    from mopoe.data import get_datasets
    from mopoe.evaluate import latent_classification, train_classifiers
    P = MMVAEPLUS_POLYMNIST_PAPER
    t0 = time.perf_counter()
    train, test, info = get_datasets("polymnist", root=args.data_dir, num_modalities=args.train_modalities,
                                     num_train=2000, num_test=500)
    torch.manual_seed(args.seed)
    enc, dec = make_networks(info, P["latent_dim"], P["private_dim"])
    liks = {m: get_likelihood("laplace", scale=P["likelihood_scale"]) for m in info.modalities}
    options = dict(P["objective_options"], **({"family": args.train_family} if args.train_family else {})) \
        if args.train_objective == "mmvaeplus" else {}
    model = MultimodalVAE(enc, dec, liks, P["latent_dim"], P["private_dim"], args.train_objective,
                          rec_weights=default_rec_weights(info.data_dims), shapes=info.shapes, **options)
    if isinstance(model.objective, MMVAEPlus): model.objective.setup(model)   # (the model calls it once the hook is in)
    opt = torch.optim.Adam(model.parameters(), lr=P["lr"], amsgrad=P["amsgrad"])
    g = torch.Generator().manual_seed(args.seed)
    batch = args.train_batch or P["batch_size"]
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, generator=g)
    print(f"{args.train_objective} {options or ''} on offline PolyMNIST ({args.train_modalities} modalities, "
          f"2000 train / 500 test), {args.train_steps} steps, batch {batch}, "
          f"beta {P['beta']}, Adam(amsgrad) lr {P['lr']}, threads {torch.get_num_threads()}")
    step, window, t_train = 0, [], time.perf_counter()
    while step < args.train_steps:
        for x, _ in loader:
            loss, logs = loss_of(model, x, P["beta"])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            window.append(loss.item()); step += 1
            if step % 25 == 0 or step == 1:
                print(f"  step {step:4d}  loss {sum(window) / len(window):9.1f}  rec {logs['rec'].item():9.1f}  "
                      f"kl {logs['kl'].item():7.1f}"
                      + (f"  r_n scales {logs['aux_scale_min'].item():.3f}..{logs['aux_scale_max'].item():.3f}"
                         if "aux_scale_min" in logs else ""),
                      flush=True)
                window = []
            if step >= args.train_steps: break
    t_train = time.perf_counter() - t_train
    if args.save: torch.save(model.state_dict(), args.save)
    model.eval()
    clf = train_classifiers(train, info, epochs=args.classifier_epochs, test_ds=test, progress=False, seed=args.seed)
    coh = cross_coherence(model, clf, test, info)
    lat = latent_classification(model, train, test, info, num_train=500)
    per = lat["per_subset"]
    uni = {k: round(v, 3) for k, v in per.items() if "," not in k}
    print(f"trained in {t_train:.0f} s ({t_train / args.train_steps:.2f} s/step); "
          f"classifiers' test accuracy {clf.scores}")
    print(f"cross-modal coherence ({len(coh['pairs']) - len(info.modalities)} pairs): mean {coh['cross_mean']:.3f}, "
          f"min {coh['cross_min']:.3f}, max {coh['cross_max']:.3f}; "
          f"self-reconstruction coherence mean {coh['self_mean']:.3f}; chance 0.1")
    print(f"latent classification on z (logistic regression on 500 encodings; unimodal): {uni}; "
          f"mean over all {len(per)} subsets (one unimodal mean per row) {sum(per.values()) / len(per):.3f}")
    print(f"pairs: {coh['pairs']}")
    from mopoe.evaluate import evaluate
    res = evaluate(model, train, test, info, classifiers=clf, metrics=("coherence",), progress=False, seed=args.seed)
    by = res["coherence"]["by_size"]
    print("mopoe.evaluate conditional coherence by number of inputs (targets outside the inputs): "
          + ", ".join(f"{k}: {v:.3f}" for k, v in by["excl_target"].items())
          + "; all targets: " + ", ".join(f"{k}: {v:.3f}" for k, v in by["all"].items()))
    print(f"total {time.perf_counter() - t0:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modalities", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["mopoe", "mmvae", "mmvaeplus"], choices=VARIANTS)
    p.add_argument("--json", default=None)
    p.add_argument("--train-steps", type=int, default=0, help="run the training check for this many steps instead")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument("--train-objective", default="mmvaeplus", choices=("mmvaeplus", "mopoe", "mmvae"),
                   help="training check: the objective (the others for comparison, same networks, latents, beta, "
                        "optimiser)")
    p.add_argument("--train-modalities", type=int, default=5,
                   help="training check: PolyMNIST modalities (M^2 decoder passes)")
    p.add_argument("--train-family", default=None, choices=("laplace", "gaussian"),
                   help="training check: MMVAE+'s latent family (default: the preset's laplace)")
    p.add_argument("--save", default=None, help="training check: write the trained model's state_dict here")
    p.add_argument("--train-batch", type=int, default=None,
                   help="training check's batch (default: the paper preset's 128)")
    args = p.parse_args(argv)
    if args.train_steps: train_check(args)
    else: bench(args)


if __name__ == "__main__":
    sys.exit(main())
