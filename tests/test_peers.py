"""MultiVae beside mopoe on identical networks (issue 31): `benchmarks/peers/multivae_compare.py --smoke` end to end.

Runs only where the optional `peers` extra (MultiVae) is installed; skipped otherwise, saying how to install it.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("multivae", reason='MultiVae is not installed (optional peers extra): pip install -e ".[peers]"')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peers", "multivae_compare.py")


def test_smoke_runs_every_stage(tmp_path):
    out, md = tmp_path / "smoke.json", tmp_path / "smoke.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out), "--md", str(md)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    text = p.stdout
    # the check ran before any timing, said so, and found both libraries' losses and gradients equal
    assert text.index("Equal loss") < text.index("Step time") < text.index("Quality after")
    assert "Check: passed" in text
    rows = res["check"]["rows"]
    assert res["check"]["passed"] and rows and all(r["ok"] for r in rows)
    assert {(r["pair"], r["masked"]) for r in rows} >= {("mopoe", False), ("mopoe", True), ("mvae", False),
                                                        ("mmvaeplus", False), ("mmvaeplus", True)}
    assert all(r["rel_diff"] <= 1e-5 and r["grad_rel_gap"] <= 1e-3 for r in rows)
    # MultiVae's contiguous blocks: every subset floor(B / K) rows, the full set the rest
    blocks = next(r["rows_per_subset"] for r in rows if r["pair"] == "mopoe" and not r["masked"])
    B, K = rows[0]["batch"], 2 ** rows[0]["M"] - 1
    assert blocks["min"] == B // K and blocks["full_set"] == B - (K - 1) * (B // K)
    # timing: both libraries, both settings, two ratios
    speed = {(r["pair"], r["setting"]): r for r in res["speed"]}
    for key in [("mopoe", "complete"), ("mopoe", "masked"), ("mvae", "complete"), ("mmvaeplus", "complete")]:
        r = speed[key]
        assert r["mopoe_ms"] > 0 and r["multivae_ms"] > 0
        assert r["ratio_of_medians"] > 0 and r["median_of_round_ratios"] > 0
    # quality: both scored by mopoe's evaluator, per seed, with a test and never a one-seed lead
    q = res["quality"]
    assert len(q["per_seed"]) == 2 and q["steps"] == 6
    for s in q["per_seed"]:
        for lib in ("mopoe", "multivae"):
            summ = s[lib]["summary"]
            assert summ["coherence_1"] is not None and summ["latent_1"] is not None and summ["loglik_X"] is not None
    assert {r["metric"] for r in q["table"]} >= {"coherence_1", "coherence_2", "latent_3", "loglik_X"}
    assert all("lead" in r["verdict"] and "holm_p" in r for r in q["table"])
    text_md = md.read_text()
    assert text_md.startswith("# mopoe beside MultiVae")
    # --render reproduces the tables from the JSON alone
    again = tmp_path / "again.md"
    p = subprocess.run([sys.executable, SCRIPT, "--render", str(out), "--md", str(again)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    drop_command = lambda s: [ln for ln in s.splitlines() if not ln.startswith("`python ")]
    assert drop_command(again.read_text()) == drop_command(text_md)
