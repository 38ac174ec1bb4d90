"""The trainer's extension points from outside the package: a user's callback sees every hook in order with the
promised state, logs its own scalars and stops a run; the KL weight has one owner and the epoch records state the β
their train and test losses used; TensorBoard event files hold the step loss terms and the final metrics."""
import json
import math

import pytest
import torch

from mopoe.learner import HOOKS, kl_weight
from mopoe.train import dataset_loss, resolve_config, run, train
from toys import INFO, ToyPairs

DATA = (ToyPairs(64, 0), ToyPairs(16, 1), INFO)


def cfg_for(out, **kw):
    return resolve_config(**{**dict(dataset="mnist_svhn_text", epochs=2, batch_size=16, latent_dim=4, out_dir=str(out),
                                    device="cpu"), **kw})


class Watcher:
    "A callback written outside mopoe: no base class, every hook, records what it sees."
    def __init__(self, stop_at=None):
        self.calls, self.stop_at, self.scalars = [], stop_at, []

    def _see(self, hook, learn):
        self.calls.append(hook)
        for name in ("config", "model", "optimizer", "epoch", "step", "history"):
            assert hasattr(learn, name), (hook, name)
        if hook in ("after_backward", "after_batch"):
            assert isinstance(learn.loss, torch.Tensor) and learn.loss.requires_grad
            assert {"loss", "rec", "kl"} <= set(learn.logs)
            assert all(isinstance(v, torch.Tensor) for v in learn.logs.values())
            x, observed = learn.batch
            assert set(x) == {"mnist", "mnist2"} and observed is None
        if hook == "after_backward":
            assert all(p.grad is not None for p in learn.model.parameters() if p.requires_grad)
        if hook == "after_epoch":
            assert learn.record is learn.history[-1] and learn.record["epoch"] == learn.epoch + 1
            self.scalars.append(("my/grad_steps", learn.step))       # a callback may compute and keep its own numbers
        if hook == "after_batch" and self.stop_at is not None and learn.step >= self.stop_at: learn.stop = True

    def __getattr__(self, hook):
        if hook in HOOKS: return lambda learn: self._see(hook, learn)
        raise AttributeError(hook)


def test_outside_callback_sees_every_hook_in_order(tmp_path):
    w = Watcher()
    res = train(cfg_for(tmp_path / "r"), callbacks=[w], progress=False, data=DATA)
    step = ["before_batch", "after_backward", "after_batch"]
    assert w.calls == ["before_fit"] + (["before_epoch"] + step * 4 + ["after_epoch"]) * 2 + ["after_fit"]
    assert w.scalars == [("my/grad_steps", 4), ("my/grad_steps", 8)] and len(res["history"]) == 2


def test_a_callback_can_stop_a_run(tmp_path):
    w = Watcher(stop_at=6)                                               # mid epoch 2: that epoch is not saved
    res = train(cfg_for(tmp_path / "r", epochs=5), callbacks=[w], progress=False, data=DATA)
    assert res["learner"].step == 6 and [h["epoch"] for h in res["history"]] == [1]
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1] and w.calls[-1] == "after_fit"


def test_beta_has_one_owner_and_the_records_state_it(tmp_path):
    "During a warm-up the train and test losses of a record are computed with the β the record states."
    cfg = cfg_for(tmp_path / "r", epochs=2, beta=2.0, beta_warmup=6)
    data = (DATA[0], ToyPairs(512, 2), INFO)                             # a large test set: little sampling noise
    res = train(cfg, progress=False, data=data)
    recs = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # 4 steps an epoch: the last step of epoch 1 is global step 3 (β = 2·3/6), of epoch 2 step 7 (β = 2)
    assert [r["beta"] for r in recs] == [kl_weight(cfg, 3), kl_weight(cfg, 7)] == [1.0, 2.0]
    assert "beta" not in vars(res["model"])                                # the model holds no β of its own
    # the test terms of the last record are the model's test loss at that β (reproduced from the final model up to the
    # sampling noise of z, which is far smaller than what a different β would change)
    at = lambda beta: dataset_loss(res["model"], data[1], cfg.batch_size, torch.device("cpu"), beta=beta)
    again, other = at(recs[-1]["beta"]), at(0.0)
    assert math.isclose(again["loss"], -again["rec"] + recs[-1]["beta"] * again["kl"], rel_tol=1e-5)
    gap, other_gap = abs(again["loss"] - recs[-1]["test_loss"]), abs(other["loss"] - recs[-1]["test_loss"])
    assert gap < 0.2 * other_gap, (again, other, recs[-1])


def test_tensorboard_event_files_hold_step_terms_and_final_metrics(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    cfg = resolve_config(dataset="mnist_svhn_text", epochs=1, batch_size=32, num_train=96, num_test=32,
                         classifier_epochs=1, loglik_samples=2, loglik_max_test=8, device="cpu", seed=1,
                         data_dir=str(data_dir), out_dir=str(out), loggers="jsonl,tensorboard,csv", sync_every=2)
    run(cfg, progress=False)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"step/loss", "step/rec", "step/kl", "epoch/train_loss", "epoch/test_loss", "epoch/beta"} <= tags, tags
    assert [e.step for e in ea.Scalars("step/loss")] == [1, 2, 3]       # every step, written in blocks of sync_every
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert [round(e.value, 3) for e in ea.Scalars("step/loss")] == first["step_losses"]
    assert any(t.startswith("eval/latent/by_size/") for t in tags)
    assert any(t.startswith("eval/coherence/") for t in tags)
    assert {"samples/mnist", "samples/svhn"} <= set(ea.Tags()["images"])
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,beta,train_loss")
