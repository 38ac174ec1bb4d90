"""Two CPU processes train with DDP (gloo) and must end with identical parameters."""
import multiprocessing as mp
import os
import socket

import torch

from mopoe.train import resolve_config, train
from toys import INFO, ToyPairs

def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = resolve_config(dataset="mnist_svhn_text", epochs=2, batch_size=8, latent_dim=4, device="cpu",
                         out_dir=out_dir, seed=3)
    res = train(cfg, progress=False, data=(ToyPairs(64, 0), ToyPairs(16, 1), INFO))
    torch.save(res["model"].state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(target, tmp_path):
    "Run `target(rank, 2, port, out_dir)` in two spawned processes; both must exit 0."
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_process_gloo_stays_in_sync(tmp_path):
    _run_two_ranks(_worker, tmp_path)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in s0: assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    # the ranks trained (parameters moved away from a fresh model with the same seed) and rank 0 alone logged
    torch.manual_seed(3)
    from mopoe.train import build_model
    fresh = build_model(resolve_config(dataset="mnist_svhn_text", latent_dim=4, seed=3), INFO).state_dict()
    assert any(not torch.equal(fresh[k], s0[k]) for k in s0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert (tmp_path / "checkpoint.pt").exists()


def _zero_noise():
    "Reparameterised draws without noise (z = the posterior mean), so that the two runs below see the same numbers."
    torch.distributions.normal._standard_normal = (lambda shape, dtype, device:
                                                   torch.zeros(shape, dtype=dtype, device=device))


def _one_step(model, x, beta=2.5):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, _ = model(x, beta=beta)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss.detach()


def _step_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _zero_noise()
    from torch.nn.parallel import DistributedDataParallel

    from mopoe.train import build_model
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(3)
    model = build_model(resolve_config(dataset="mnist_svhn_text", objective="mvae", latent_dim=4, seed=3), INFO)
    x, _ = ToyPairs(16, 5)[torch.arange(16)]
    half = {m: t[rank * 8:(rank + 1) * 8] for m, t in x.items()}           # rank r: rows 8r .. 8r + 7 of the union
    _one_step(DistributedDataParallel(model), half)
    if rank == 0: torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def test_one_ddp_step_equals_one_step_on_the_union_of_the_batches(tmp_path):
    "Issue 22.6: two gloo processes with 8 rows each take the same Adam step as one process on all 16 rows."
    _run_two_ranks(_step_worker, tmp_path)
    saved = torch.distributions.normal._standard_normal
    try:
        _zero_noise()
        from mopoe.train import build_model
        torch.manual_seed(3)
        model = build_model(resolve_config(dataset="mnist_svhn_text", objective="mvae", latent_dim=4, seed=3), INFO)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x, _ = ToyPairs(16, 5)[torch.arange(16)]
        _one_step(model, x)
    finally: torch.distributions.normal._standard_normal = saved
    ddp = torch.load(tmp_path / "ddp.pt")
    moved = [k for k in ddp if not torch.equal(before[k], model.state_dict()[k])]
    assert moved                                                              # the step changed the parameters
    for k, v in model.state_dict().items(): torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
