"""Smoke test of the benchmark scripts in --quick mode: they run and write well-formed JSON (no speed asserted)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, out, *extra):
    p = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text())


def _positive(d):
    return d["median"] > 0 and d["min"] > 0 and all(t > 0 for t in d["all"])


def test_bench_objective_quick(tmp_path):
    res = _run("bench_objective.py", tmp_path / "objective.json")
    assert {"machine", "settings", "results", "targets", "wall_seconds"} <= set(res)
    assert res["settings"]["quick"] and [r["M"] for r in res["results"]] == [2, 3]
    for r in res["results"]:
        assert r["subsets"] == 2 ** r["M"] - 1
        assert set(r["times"]) == {"bare", "mopoe", "mopoe_masked", "mopoe_exact", "mvae", "mmvae", "subset_elbos"}
        assert all(_positive(t) for t in r["times"].values())
        assert all(v > 0 for v in r["ratio_to_bare"].values())
        assert _positive(r["fusion"]) and _positive(r["fusion_sampled_kl"]) and _positive(r["fusion_subset_sample"])
        assert r["masked_over_complete"] > 0
        assert r["sampled_kl"]["subset_sample"]["batch_mean_std"] >= 0
        assert 0 < r["fusion_fraction_of_mopoe_step"] and r["fusion_per_subset_element_ns"] > 0
        assert r["sampled_kl"]["exact_batch_mean_kl"] > 0 and r["sampled_kl"]["sampled_std"] >= 0
    mem = res["results"][0]["memory"]
    assert {"bare", "mopoe", "mopoe_masked"} <= set(mem)
    assert res["results"][0]["memory_masked_over_complete"] > 0
    for m in mem.values():
        assert m["peak_rss_mb"] > 0 and m["after_import_mb"] > 0 and m["peak_rss_mb"] >= m["after_import_mb"]
    assert res["results"][0]["memory_ratio_to_bare"]["mopoe"] > 0


def test_bench_eval_quick(tmp_path):
    res = _run("bench_eval.py", tmp_path / "eval.json")
    assert {"machine", "settings", "results"} <= set(res)
    (r,) = res["results"]
    assert r["M"] == 2 and r["mode"] in ("evaluate", "primitives")
    assert set(r["throughput"]) == {"latent", "coherence", "loglik"}
    for v in r["throughput"].values():
        assert v["examples_per_s"] > 0 and v["seconds"] > 0


def test_bench_eval_loglik_ab_quick(tmp_path):
    "Both arms run on the same data; the batched one makes one decoder call per modality and chunk (4 proposals, M=2)."
    res = _run("bench_eval.py", tmp_path / "ab.json", "--loglik-ab", "--repeats", "1")
    (r,) = res["results"]
    assert r["M"] == 2 and r["proposals"] == 4
    assert r["per proposal"]["decoder_calls"] == 4 * 2 and r["batched"]["decoder_calls"] == 2  # 16 tuples: one chunk
    assert r["speedup"] > 0


def test_bench_loop_quick(tmp_path):
    "The loop benchmark runs both settings with a bare arm, today's Learner and (if history allows) an earlier one's."
    has_rev = subprocess.run(["git", "cat-file", "-e", "595f7f1"], cwd=BENCH.parent,
                             capture_output=True).returncode == 0
    res = _run("bench_loop.py", tmp_path / "loop.json", *(["--ab", "595f7f1"] if has_rev else []))
    arms = {"learner", "learner_old"} if has_rev else {"learner"}      # a shallow clone lacks the old revision
    for setting in ("tiny", "main_job"):
        r = res[setting]
        assert set(r["median_s"]) == {"bare", *arms} and all(v > 0 for v in r["median_s"].values())
        assert set(r["ratio_to_bare"]) == arms and all(v > 0 for v in r["ratio_to_bare"].values())
