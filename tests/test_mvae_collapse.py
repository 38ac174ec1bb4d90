"""The faithful MVAE's experts switch themselves off in a product with the prior expert on PolyMNIST, and the KL
warm-up keeps them alive over the same steps (results/mvae_collapse.md; the measurement is
benchmarks/check_mvae_collapse.py)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_mvae_collapse", ROOT / "benchmarks" / "check_mvae_collapse.py")
check_mvae_collapse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_mvae_collapse)


def test_prior_expert_collapse_and_the_warmup_that_prevents_it(data_dir):
    run = lambda variant: check_mvae_collapse.check(variant, steps=50, every=25, num_train=2000, data_dir=str(data_dir))
    faithful, warm = run("cpu")["rows"], run("warmup")["rows"]
    assert faithful[0]["switched_off"] == 0                                   # alive at initialisation
    assert faithful[-1]["switched_off"] > 0.9 and faithful[-1]["kl"] < 0.01   # all experts off: posterior = prior
    assert warm[-1]["switched_off"] == 0 and warm[-1]["kl"] > 1               # warmed up: the experts carry information
