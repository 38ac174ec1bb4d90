"""MVAE's test log-likelihood with few inputs: the earlier variant (prior expert only in the full set's product, no
unimodal ELBOs) against the faithful one (prior expert in every product + the unimodal ELBOs), issue 12.

Both are trained from the same initial weights, on the same batches, for `--steps` Adam steps on the offline
PolyMNIST (cpu preset networks and sizes), then `MultimodalVAE.log_likelihood` (15 importance samples) is averaged
over `--num-test` test tuples for the proposal given every single modality, every pair, and all five ("X").

Usage: python benchmarks/check_mvae_loglik.py --steps 600 --num-test 100 --json out.json
"""
import argparse
import json
import time

import torch

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from torch.utils.data import DataLoader

    from mopoe.experts import subset_mask, subset_names
    from mopoe.train import build_data, build_model, resolve_config
    cfg = resolve_config(dataset="polymnist", objective="mvae", data_dir=a.data_dir)
    train, test, info = build_data(cfg)
    variants = {"earlier (prior in the full product only, no unimodal ELBOs)":
                dict(prior_expert="full", unimodal_elbos=False),
                "faithful (prior in every product + unimodal ELBOs)": dict()}
    out = {"steps": a.steps, "num_test": a.num_test,
           "config": {k: getattr(cfg, k) for k in ("latent_dim", "beta", "lr", "batch_size")}, "results": {}}
    xt, _ = next(iter(DataLoader(test, batch_size=a.num_test)))
    mods = list(info.modalities)
    mask = subset_mask(len(mods))
    names = subset_names(mask, mods)
    for label, opts in variants.items():
        torch.manual_seed(0)
        from mopoe.model import MultimodalVAE
        base = build_model(cfg, info)
        model = MultimodalVAE(dict(base.encoders), dict(base.decoders), base.likelihoods, cfg.latent_dim, 0,
                              objective="mvae", rec_weights=base.rec_weights, shapes=info.shapes, **opts)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                            drop_last=True)
        t, step = time.perf_counter(), 0
        while step < a.steps:
            for x, _ in loader:
                loss, _ = model(x, beta=cfg.beta)
                opt.zero_grad(); loss.backward(); opt.step()
                step += 1
                if step >= a.steps: break
        model.eval()
        torch.manual_seed(1)
        ll = {n: model.log_likelihood(xt, given=[m for m, on in zip(mods, r.tolist(), strict=True) if on]).mean().item()
              for n, r in zip(names, mask, strict=True) if r.sum() in (1, 2, len(mods))}
        by = {k: sum(v for n, v in ll.items() if len(n.split(",")) == k) / sum(1 for n in ll if len(n.split(",")) == k)
              for k in (1, 2, len(mods))}
        out["results"][label] = {"train_seconds": time.perf_counter() - t, "final_loss": float(loss.detach()),
                                 "loglik": ll, "by_size": by}
        print(f"{label}: log p(X) estimate, proposal from 1 input {by[1]:.4g}, 2 inputs {by[2]:.4g}, "
              f"all ('X') {by[len(mods)]:.4g} nats", flush=True)
    if a.json:
        with open(a.json, "w") as f: json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
