"""Plugins from outside, in fresh processes: an objective and a metric written in a package of the user's run through
`mopoe-train --plugins …`, are evaluated again by `mopoe-eval` (the run records its plugins), and load from an installed
entry point with no flag; a stateful callback survives kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

PLUGIN = '''
"""A user's plugin: an objective and a metric, each one class and one registration."""
from mopoe.metric import Metric, register_metric
from mopoe.objectives import MoPoE, register_objective


@register_objective
class HalfKLMoPoE(MoPoE):
    "MoPoE whose KL term is weighted by one half on top of beta (a toy variant for the plugin test)."
    name, equation = "{objective}", "Eq. 6 with beta/2"
    def loss(self, mu, logvar, log_lik, beta=1.0, observed=None, ids=None, check=True):
        return super().loss(mu, logvar, log_lik, beta=0.5 * beta, observed=observed, ids=ids, check=check)


@register_metric
class ReconError(Metric):
    "Mean absolute error of every modality reconstructed from all of them."
    name = "{metric}"
    def begin(self, ctx): self.err, self.n = dict.fromkeys(ctx.modalities, 0.0), 0
    def batch(self, ctx, x, y, experts):
        rec = ctx.model.cond_generate(x, given=ctx.modalities, experts=experts)
        for m in ctx.modalities: self.err[m] += (rec[m] - x[m]).abs().flatten(1).mean(1).sum().item()
        self.n += len(y)
    def end(self, ctx): return {{m: e / self.n for m, e in self.err.items()}}
'''


def _write_plugin(root: Path, module: str, objective: str, metric: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(PLUGIN.format(objective=objective, metric=metric))
    return root


def _env(pythonpath: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}


def _flags(d: dict) -> list:
    return [a for k, v in d.items() for a in (f"--{k}", str(v))]


def _run(cmd, args, env, timeout=600):
    return subprocess.run([str(BIN / cmd), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_plugin_module_through_the_commands(tmp_path, data_dir):
    plug = _write_plugin(tmp_path / "site", "my_mopoe_plugin", "half_kl_mopoe", "recon_error")
    out = tmp_path / "run"
    args = _flags({**TINY, "data_dir": data_dir, "out_dir": out, "plugins": "my_mopoe_plugin",
                   "objective": "half_kl_mopoe", "metrics": "latent,recon_error"})
    r = _run("mopoe-train", args, _env(plug))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "half_kl_mopoe" and res["config"]["plugins"] == "my_mopoe_plugin"
    assert set(res["metrics"]["recon_error"]) == {"mnist", "svhn", "text"}
    assert all(0 < v < 1 for v in res["metrics"]["recon_error"].values())
    # a fresh process evaluates it again: the run's recorded plugins are imported before the model is rebuilt
    r = _run("mopoe-eval", [str(out), "--data_dir", str(data_dir), "--metrics", "recon_error"], _env(plug))
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["written_by"] == "mopoe-eval" and again["metrics"]["recon_error"] == res["metrics"]["recon_error"]
    # --help of a fresh process lists the plugin's objective among the choices
    h = _run("mopoe-train", ["--plugins", "my_mopoe_plugin", "--help"], _env(plug))
    assert h.returncode == 0 and "half_kl_mopoe" in h.stdout
    # without the module on the path: one line naming it, exit status 2, nothing created
    r = _run("mopoe-train", [*args[:-2], "--out_dir", str(tmp_path / "other")], _env(tmp_path / "nowhere"))
    assert r.returncode == 2 and "plugin 'my_mopoe_plugin'" in r.stderr and "ModuleNotFoundError" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()


def test_plugin_from_an_installed_entry_point(tmp_path, data_dir):
    "A distribution on sys.path declaring a `mopoe.plugins` entry point is loaded by a fresh mopoe-train with no flag."
    site = _write_plugin(tmp_path / "site", "ep_mopoe_plugin", "ep_half_kl_mopoe", "ep_recon_error")
    dist = site / "ep_mopoe_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-mopoe-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mopoe.plugins]\nep = ep_mopoe_plugin\n")
    out = tmp_path / "run"
    r = _run("mopoe-train", _flags({**TINY, "data_dir": data_dir, "out_dir": out, "objective": "ep_half_kl_mopoe",
                                    "metrics": "ep_recon_error"}), _env(site))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "ep_half_kl_mopoe" and res["config"]["plugins"] == ""
    assert set(res["metrics"]["ep_recon_error"]) == {"mnist", "svhn", "text"}
    # the same package, broken: the error names the entry point and its distribution
    (site / "ep_mopoe_plugin.py").write_text("raise RuntimeError('broken plugin')\n")
    r = _run("mopoe-train", ["--out_dir", str(tmp_path / "x")], _env(site))
    assert r.returncode == 2 and "entry point 'ep' of ep-mopoe-plugin" in r.stderr and "broken plugin" in r.stderr


KILLER = '''
import os, signal, sys
from mopoe.learner import Callback
from mopoe.train import resolve_config, train

class StepCounter(Callback):
    "Counts the steps it has seen; its count is saved with every checkpoint and restored on resume."
    def __init__(self): self.steps = 0
    def after_batch(self, learn):
        self.steps += 1
        if KILL_AT and learn.step == KILL_AT: os.kill(os.getpid(), signal.SIGKILL)      # mid-epoch 3: a hard kill
    def state_dict(self): return {{"steps": self.steps}}
    def load_state_dict(self, d): self.steps = d["steps"]

KILL_AT = {kill_at}
counter = StepCounter()
cfg = resolve_config(dataset="mnist_svhn_text", epochs=4, batch_size=32, num_train=96, num_test=32, latent_dim=4,
                     device="cpu", data_dir=sys.argv[1], out_dir=sys.argv[2], resume={resume}, metrics="latent")
train(cfg, [counter], progress=False)
print("STEPS", counter.steps)
'''


def test_a_stateful_callback_survives_kill_9_and_resume(tmp_path, data_dir):
    out = tmp_path / "run"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(kill_at=8, resume=False))         # 3 steps an epoch: killed in epoch 3
    r = subprocess.run([sys.executable, str(script), str(data_dir), str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    from mopoe.train import load_checkpoint
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["callbacks"] == {"StepCounter": {"steps": 6}}
    script.write_text(KILLER.format(kill_at=0, resume=True))
    r = subprocess.run([sys.executable, str(script), str(data_dir), str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "STEPS 12" in r.stdout                                      # 6 restored + epochs 3 and 4, not 6 from scratch
    assert [json.loads(s)["epoch"] for s in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
