"""The objective interface from outside the package: a new objective is one class + one registration; the
registry, the deprecated names, and a training step that reads no device value."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mopoe.model import MultimodalVAE
from mopoe.objectives import OBJECTIVES, MoPoE, Objective, get_objective, load_objectives, register_objective

def _model(objective, Dp=0, M=3, **kw):
    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(s): super().__init__(); s.l = nn.Linear(6, 2 * (4 + Dp))
        def forward(s, t): return s.l(t).chunk(2, -1)
    names = [f"m{i}" for i in range(M)]
    return MultimodalVAE({m: Enc() for m in names},
                         {m: nn.Sequential(nn.Linear(4 + Dp, 6), nn.Sigmoid()) for m in names},
                         {m: "laplace" for m in names}, 4, Dp, objective, **kw)


def _batch(M=3, B=10):
    torch.manual_seed(1)
    obs = torch.rand(B, M) < 0.6
    obs[:, 0] |= ~obs.any(1)
    return {f"m{i}": torch.rand(B, 6) for i in range(M)}, obs


def test_new_objective_is_one_class_and_one_registration():
    @register_objective
    class HalfKL(MoPoE):                           # MoPoE with the KL counted at half weight, as a user would write it
        name, equation = "test_half_kl", "Eq. 6 with beta / 2"

        def loss(self, mu, logvar, log_lik, beta=1.0, observed=None, ids=None, check=True):
            return super().loss(mu, logvar, log_lik, beta / 2, observed, ids, check)
    try:
        model, ref = _model("test_half_kl"), _model("mopoe")
        x, obs = _batch()
        torch.manual_seed(2); a = model(x, beta=3.0, observed=obs)[0]
        torch.manual_seed(2); b = ref(x, beta=1.5, observed=obs)[0]
        assert torch.equal(a, b)
        assert isinstance(model.objective, HalfKL) and isinstance(model.objective, nn.Module)
    finally:
        del OBJECTIVES["test_half_kl"]


def test_objective_parameters_train_and_are_saved():
    @register_objective
    class Scaled(MoPoE):
        name = "test_scaled"

        def setup(self, model): self.log_w = nn.Parameter(torch.zeros(()))

        def loss(self, mu, logvar, log_lik, beta=1.0, observed=None, ids=None, check=True):
            loss, logs = super().loss(mu, logvar, log_lik, beta, observed, ids, check)
            return loss * self.log_w.exp() + self.log_w ** 2, logs
    try:
        model = _model("test_scaled")
        assert "objective.log_w" in model.state_dict()
        x, _ = _batch()
        model(x)[0].backward()
        assert model.objective.log_w.grad is not None and model.objective.log_w.grad != 0
    finally:
        del OBJECTIVES["test_scaled"]


def test_registry_names_and_options():
    names = load_objectives()
    assert {"mopoe", "mvae", "mmvae", "subset_elbos", "mmjsd", "mopoe_aux"} <= set(names)
    assert list(names)[:4] == ["mopoe", "mvae", "mmvae", "subset_elbos"]
    assert OBJECTIVES["mvae"].option_names() == ("prior_expert", "kl", "sampling", "kl_samples", "unimodal_elbos")
    assert OBJECTIVES["mmjsd"].option_names() == ("sampling", "prior_weight")
    with pytest.raises(ValueError, match="takes the options sampling, prior_weight"):
        get_objective("mmjsd", prior_expert="all")
    with pytest.raises(ValueError, match="choose one of mopoe, mvae, mmvae, subset_elbos"):
        get_objective("nope")
    import mopoe.experts
    assert not hasattr(mopoe.experts, "OBJECTIVES")                       # the registry lives in mopoe.objectives only
    with pytest.raises(TypeError):
        register_objective(Objective.__init__)


class _HostReads(TorchDispatchMode):
    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.nonzero.default)

    def __init__(s): super().__init__(); s.reads = []

    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        if func in s.READS: s.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["mopoe", "mvae", "mmvae", "subset_elbos", "mmjsd", "mopoe_aux"])
def test_training_step_reads_no_device_value(objective):
    x, obs = _batch()
    for Dp in ((2,) if OBJECTIVES.get(objective, MoPoE).needs_private else (0, 2)):
        model = _model(objective, Dp, check_inputs=False)
        for kw in ({}, dict(observed=obs)):
            model(x, beta=1.0, **kw)                                             # caches warm
            with _HostReads() as c:
                loss, logs = model(x, beta=torch.tensor(2.5), **kw)
                loss.backward()
            assert c.reads == [], (objective, Dp, kw.keys(), c.reads)
            assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())


def test_model_beta_is_the_callers():
    with pytest.raises(ValueError, match="takes the options"):
        _model("mopoe", beta=5.0)                                      # the model holds no beta: not an option
    model = _model("mopoe")
    x, _ = _batch()
    torch.manual_seed(0); a = model(x)[0]
    torch.manual_seed(0); b = model(x, beta=1.0)[0]
    assert torch.equal(a, b)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            model(x, beta=bad)


def test_objective_parameters_round_trip_through_the_state_dict():
    model = _model("mopoe_aux", Dp=2)
    x, obs = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad(); model(x, observed=obs)[0].backward(); opt.step()
    assert any((p != 0).any() for p in model.objective.aux_logscale.values())
    again = _model("mopoe_aux", Dp=2)
    again.load_state_dict(model.state_dict())
    for m in model.modalities:
        assert torch.equal(again.objective.aux_logscale[m], model.objective.aux_logscale[m])
    torch.manual_seed(5); a = model(x, observed=obs)[0]
    torch.manual_seed(5); b = again(x, observed=obs)[0]
    assert torch.equal(a, b)
