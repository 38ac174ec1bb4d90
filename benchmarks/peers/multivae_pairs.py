"""mopoe's networks inside MultiVae's models: one (mopoe, MultiVae) pair per objective on identical modules.

Every pair is built from ONE call of `mopoe.train.build_model` (a resolved config for a dataset preset): the mopoe
model keeps its modules, MultiVae gets deep copies of the very same modules (so both start from the same weights and
train independently), wrapped in thin pythae `BaseEncoder` / `BaseDecoder` classes that only repackage the outputs
(`(mu, logvar)` -> `ModelOutput(embedding, log_covariance[, style_*])`, a tensor -> `ModelOutput(reconstruction)`).
After training, `mopoe_view` puts MultiVae's trained modules back into a mopoe `MultimodalVAE` of the same objective,
so that both models are scored by mopoe's evaluator with the same classifiers.

The pairs (MultiVae 1.0.x names):

| key | mopoe objective | MultiVae model | loss equal given the same draws? |
|---|---|---|---|
| mopoe | `mopoe` (kl exact: `subset_average`) | `MoPoE` | yes, given the same row-to-subset assignment |
| mopoe_auto | `mopoe` (kl `auto`: sampled above 31 subsets) | `MoPoE` | M <= 5 only (exact there); mopoe's default |
| mvae | `mvae` (faithful: prior in each product, unimodal ELBOs) | `MVAE` (k=0, no warm-up) | complete, equal weights |
| mmvaeplus | `mmvaeplus` (K=1, elbo, Laplace) | `MMVAEPlus` (K=1, iwae_looser, Laplace) | yes, same noise |
| mmvae | `mmvae` (Eq. 9-10) | `MMVAE` | no: another estimator (see `ESTIMATOR_NOTES`) |

Nothing here changes either library: the checks capture MultiVae's own draws (its row-to-subset assignment, its
Laplace noise) by wrapping methods of one model instance, and hand them to mopoe through its public arguments
(`ids` of an objective's `loss`, `noise` of MMVAE+'s `model_loss`).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
from torch import nn

PAIRS = ("mopoe", "mopoe_auto", "mvae", "mmvaeplus", "mmvae")
MULTIVAE_MODEL = {"mopoe": "MoPoE", "mopoe_auto": "MoPoE", "mvae": "MVAE", "mmvaeplus": "MMVAEPlus", "mmvae": "MMVAE"}
MOPOE_OBJECTIVE = {"mopoe": "mopoe", "mopoe_auto": "mopoe", "mvae": "mvae", "mmvaeplus": "mmvaeplus", "mmvae": "mmvae"}

ESTIMATOR_NOTES = {
    "mopoe": ("same Eq. 6 estimator: one subset per row, reparameterised sample, closed-form KL averaged over the "
              "allowed subsets. Only the assignment of rows to subsets differs: MultiVae's "
              "deterministic_mixture_component_selection gives contiguous blocks of floor(B/K) rows to each subset "
              "in its order and the rest to the last (the full set); mopoe draws a stratified random assignment "
              "(each subset B/K rows in expectation, Eq. 6's weights). With masks both pick uniformly among the "
              "row's available subsets at random."),
    "mopoe_auto": ("mopoe's default kl='auto': the exact subset-average KL up to 31 subsets (M <= 5), above it an "
                   "unbiased sampled average of 16 subsets a row – less work than MultiVae's exact average."),
    "mvae": ("complete data: the same joint ELBO (prior expert in the product) + the M unimodal ELBOs. With masks "
             "the libraries weigh the unimodal ELBOs differently (MultiVae: a mean over the tuples that have the "
             "modality; mopoe: a mean over the batch, 0 for tuples that lack it), so no masked pair is run. With "
             "non-uniform reconstruction weights (MNIST-SVHN-Text's data-size weights) MultiVae also weighs the "
             "unimodal ELBOs' reconstructions, mopoe leaves them unweighted (as the authors' MVAE): equal only with "
             "uniform weights (PolyMNIST)."),
    "mmvaeplus": ("the authors' stratified ELBO (K=1) with Laplace posteriors (softmax scales), the auxiliary priors "
                  "r_n for cross-modal reconstruction; MultiVae returns the batch sum, mopoe the batch mean "
                  "(compared as mean x B)."),
    "mmvae": ("different estimators: MultiVae's MMVAE is the stratified IWAE of Shi et al. (every modality's z "
              "decoded by every decoder, M^2 decoder passes, log q of the mixture by Monte Carlo, no beta); "
              "mopoe's 'mmvae' is the paper's Eq. 9-10 (one unimodal component per row, M decoder passes, "
              "closed-form KL). No loss check is possible and the step times compare different work: "
              "reported apart, never as a speed ratio."),
}


def multivae_version() -> str | None:
    "The installed MultiVae version, None when it is not installed."
    try:
        from importlib.metadata import PackageNotFoundError, version
        try: return version("multivae")
        except PackageNotFoundError: return None
    except ImportError: return None


def require_multivae():
    "Import MultiVae or exit with the command that installs it."
    try:
        import multivae  # noqa: F401
        from multivae.models import MMVAE, MVAE, MMVAEPlus, MoPoE  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"MultiVae is not importable ({e}); "
                         "install the optional extra: pip install -e \".[peers]\"") from e


# ---------------------------------------------------------------------------------------------------------------
# wrappers: the same modules, MultiVae's calling convention

def _wrappers():
    from multivae.models.nn.base_architectures import BaseMultilatentEncoder
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn.base_architectures import BaseDecoder

    class SharedEncoder(BaseMultilatentEncoder):
        "A mopoe encoder ((mu, logvar) of latent_dim + private_dim columns) in MultiVae's convention."
        def __init__(self, net: nn.Module, latent_dim: int, private_dim: int = 0):
            super().__init__()
            self.net, self.latent_dim, self.style_dim = net, int(latent_dim), int(private_dim)

        def forward(self, x):
            mu, lv = self.net(x)
            D = self.latent_dim
            if not self.style_dim: return ModelOutput(embedding=mu, log_covariance=lv)
            return ModelOutput(embedding=mu[:, :D], log_covariance=lv[:, :D],
                               style_embedding=mu[:, D:], style_log_covariance=lv[:, D:])

    class SharedDecoder(BaseDecoder):
        "A mopoe decoder (likelihood parameters) in MultiVae's convention."
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z))

    return SharedEncoder, SharedDecoder


_DIST = {"laplace": "laplace", "gaussian": "normal", "bernoulli": "bernoulli", "categorical": "categorical"}


def multivae_config(pair: str, model, beta: float, K: int = 1):
    "MultiVae's config for `pair` matching the mopoe `model` (likelihoods, scales, reconstruction weights, beta)."
    from multivae.models import MMVAEConfig, MMVAEPlusConfig, MoPoEConfig, MVAEConfig
    names = list(model.modalities)
    dists, params = {}, {}
    for m in names:
        lik = model.likelihoods[m]
        kind = type(lik).__name__.lower()
        if kind not in _DIST:
            raise ValueError(f"no MultiVae decoder distribution for mopoe's {type(lik).__name__} ({m})")
        dists[m] = _DIST[kind]
        if hasattr(lik, "scale"): params[m] = {"scale": float(lik.scale)}
    shapes = {m: tuple(model.shapes[m]) for m in names} if model.shapes else None
    rescale = {m: float(model.rec_weights[m]) for m in names}
    common = dict(n_modalities=len(names), latent_dim=model.latent_dim, input_dims=shapes, decoders_dist=dists,
                  decoder_dist_params=params, uses_likelihood_rescaling=any(w != 1.0 for w in rescale.values()),
                  rescale_factors=rescale)
    if pair in ("mopoe", "mopoe_auto"): return MoPoEConfig(**common, beta=beta)
    if pair == "mvae": return MVAEConfig(**common, beta=beta, use_subsampling=True, k=0, warmup=0)
    if pair == "mmvaeplus":
        return MMVAEPlusConfig(**common, beta=beta, K=K, modalities_specific_dim=model.private_dim, loss="iwae_looser",
                               prior_and_posterior_dist="laplace_with_softmax", learn_modality_prior=True,
                               learn_shared_prior=False, reconstruction_option="joint_prior")
    if pair == "mmvae":
        return MMVAEConfig(**common, beta=beta, K=K, prior_and_posterior_dist="normal", learn_prior=False,
                           loss="iwae_looser")
    raise ValueError(f"unknown pair {pair!r}; choose one of {', '.join(PAIRS)}")


def multivae_from(pair: str, model, beta: float, K: int = 1):
    "A MultiVae model of `pair` around deep copies of `model`'s encoders and decoders (same initial weights)."
    import multivae.models as mvm
    SharedEncoder, SharedDecoder = _wrappers()
    enc = {m: SharedEncoder(copy.deepcopy(model.encoders[m]), model.latent_dim, model.private_dim)
           for m in model.modalities}
    dec = {m: SharedDecoder(copy.deepcopy(model.decoders[m])) for m in model.modalities}
    cls = getattr(mvm, MULTIVAE_MODEL[pair])
    mv = cls(multivae_config(pair, model, beta, K), encoders=enc, decoders=dec)
    if pair == "mmvaeplus":          # r_n's learnable scale starts at softmax(0)*Dp = 1, as mopoe's aux_raw = 0
        with torch.no_grad():
            for m in model.modalities: mv.logvars_priors[m].zero_()
    return mv


def mopoe_view(pair: str, mv, template):
    "A mopoe MultimodalVAE (the `template`'s objective, likelihoods and options) on MultiVae's trained modules."
    out = copy.deepcopy(template)
    for m in out.modalities:
        out.encoders[m] = mv.encoders[m].net
        out.decoders[m] = mv.decoders[m].net
    if pair == "mmvaeplus":                      # r_n: MultiVae's logvars_priors is the same raw parameter as aux_raw
        with torch.no_grad():
            for i, m in enumerate(out.modalities): out.objective.aux_raw[i].copy_(mv.logvars_priors[m].view(-1))
    return out.eval()


def same_weights(model, mv) -> bool:
    "True when every encoder and decoder parameter of the MultiVae model equals the mopoe model's."
    for m in model.modalities:
        for a, b in ((model.encoders[m], mv.encoders[m].net), (model.decoders[m], mv.decoders[m].net)):
            for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
                if p.shape != q.shape or not torch.equal(p, q): return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# batches in both conventions

def zero_missing(x: dict, observed, names) -> dict:
    "Missing entries zero-filled (MultiVae's IncompleteDataset convention; mopoe ignores what they hold)."
    if observed is None: return x
    return {m: torch.where(observed[:, i].view(-1, *(1,) * (x[m].dim() - 1)), x[m], torch.zeros((), dtype=x[m].dtype))
            for i, m in enumerate(names)}


def multivae_batch(x: dict, observed, names):
    "The batch as MultiVae's trainer hands it to a model: a dataset object with `data` (and `masks` when incomplete)."
    from multivae.data.datasets.base import IncompleteDataset, MultimodalBaseDataset
    if observed is None: return MultimodalBaseDataset(data=dict(x))
    return IncompleteDataset(data=dict(x), masks={m: observed[:, i].clone() for i, m in enumerate(names)})


def multivae_loss(pair: str, mv, x: dict, observed, names):
    "MultiVae's training loss on a batch, per example (its MMVAE and MMVAE+ losses are batch sums: divided by B)."
    out = mv(multivae_batch(x, observed, names))
    B = next(iter(x.values())).shape[0]
    return out.loss / B if pair in ("mmvaeplus", "mmvae") else out.loss


def make_missing(n: int, M: int, rate: float, seed: int):
    "A (n, M) availability mask: each entry missing with probability `rate`, at least one modality a tuple."
    from mopoe.incomplete import missing_mask
    return missing_mask(n, M, rate, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# the equal-loss check

def _subset_rows(mv, names) -> list:
    "For each MultiVae MoPoE subset (its order, the empty one left out) the row of mopoe's subset_mask."
    from mopoe.experts import subset_mask
    mask = subset_mask(len(names))
    where = {tuple(r.tolist()): i for i, r in enumerate(mask)}
    rows = []
    for key, mods in mv.subsets.items():
        if key == "": continue
        rows.append(where[tuple(m in mods for m in names)])
    return rows


class _CaptureSelection:
    "Wrap one MultiVae MoPoE instance's selection methods: record each row's subset; optionally keep the RNG untouched."
    def __init__(self, mv, keep_rng: bool):
        self.mv, self.keep_rng, self.ids = mv, keep_rng, None
        names = ("deterministic_mixture_component_selection", "random_mixture_component_selection")
        self.orig = {n: getattr(mv, n) for n in names}

    def _wrap(self, name):
        orig = self.orig[name]
        def selection(mus, logvars, weights):
            K, B = mus.shape[:2]
            idx = torch.arange(K, dtype=mus.dtype, device=mus.device).view(K, 1, 1).expand(K, B, 1)
            state = torch.get_rng_state() if self.keep_rng else None
            # one draw: the subset index rides along as an extra latent column
            mu_sel, lv_sel = orig(torch.cat([mus, idx], -1), torch.cat([logvars, idx], -1), weights)
            if state is not None: torch.set_rng_state(state)       # the selection's draw leaves the noise stream alone
            self.ids = mu_sel[:, -1].round().long()
            return mu_sel[:, :-1], lv_sel[:, :-1]
        return selection

    def __enter__(self):
        for n in self.orig: setattr(self.mv, n, self._wrap(n))
        return self

    def __exit__(self, *exc):
        for n in self.orig:
            if n in self.mv.__dict__: del self.mv.__dict__[n]


def multivae_assignment(mv, x: dict, observed, names, seed: int = 0):
    "MultiVae MoPoE's row-to-subset assignment on this batch as rows of mopoe's subset_mask: (B,)."
    with _CaptureSelection(mv, keep_rng=False) as cap, torch.no_grad():
        torch.manual_seed(seed)
        mv.inference(multivae_batch(x, observed, names))
    rows = torch.tensor(_subset_rows(mv, names))
    return rows[cap.ids]


def _grads(params) -> list:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _pair_params(model, mv, names):
    a, b = [], []
    for m in names:
        for x, y in ((model.encoders[m], mv.encoders[m].net), (model.decoders[m], mv.decoders[m].net)):
            a += list(x.parameters()); b += list(y.parameters())
    return a, b


def _grad_gap(ga, gb) -> float:
    "max |g_a - g_b| over every parameter, relative to max |g_a|."
    num = max(float((x - y).abs().max()) for x, y in zip(ga, gb, strict=True))
    den = max(float(x.abs().max()) for x in ga)
    return num / den if den > 0 else num


_NO_SHAPE = torch.Size()                               # rsample's default sample shape, as torch's own signature


class _RecordingLaplace:
    "A factory of torch Laplace distributions whose rsample records its standard noise (sample - loc) / scale."
    def __init__(self, log: list):
        from torch.distributions import Laplace
        rec = log

        class Recording(Laplace):
            def rsample(self, sample_shape=_NO_SHAPE):
                s = super().rsample(sample_shape)
                rec.append(((s - self.loc) / self.scale).detach())
                return s
        self.cls = Recording

    def __call__(self, *args, **kwargs): return self.cls(*args, **kwargs)


def check_pair(pair: str, model, mv, x: dict, observed, beta: float, seed: int = 0) -> dict:
    """Both libraries' loss (per example) and gradients on one batch with the same draws; mopoe's own draw beside it.

    mopoe / MoPoE: MultiVae's row-to-subset assignment (captured from its own selection method) is given to mopoe's
    objective as `ids`; both then draw the one reparameterisation noise from the same seed. MVAE: the same seed, no
    other draw. MMVAE+: MultiVae's Laplace noise (captured from its distributions) is given to mopoe as `noise`.
    Returns the losses, |difference|, relative difference, the gradients' largest relative gap, and mopoe's loss
    with its own assignment (what an unforced step computes)."""
    names = list(model.modalities)
    B = next(iter(x.values())).shape[0]
    x = zero_missing(x, observed, names)
    model.train(); mv.train()
    pa, pb = _pair_params(model, mv, names)
    for p in pa + pb: p.grad = None
    out = {"pair": pair, "M": len(names), "batch": B, "masked": observed is not None}
    if pair in ("mopoe", "mopoe_auto"):
        with _CaptureSelection(mv, keep_rng=True) as cap:
            torch.manual_seed(seed)
            lb = multivae_loss(pair, mv, x, observed, names)
        ids = torch.tensor(_subset_rows(mv, names))[cap.ids]
        torch.manual_seed(seed)
        xp, obs = model.prepare(x, observed)
        mu, lv, _, private = model.encode(xp, obs)
        la, _ = model.objective.loss(mu, lv, model.log_lik(xp, obs, private), beta, observed=obs, ids=ids, check=False)
        counts = torch.bincount(ids, minlength=len(model.subsets))
        out["rows_per_subset"] = {"min": int(counts.min()), "max": int(counts.max()),
                                  "full_set": int(counts[-1]), "eq6_expected": B / len(model.subsets)}
    elif pair == "mvae":
        if observed is not None: raise ValueError("mvae: no masked pair (the unimodal ELBOs are weighed differently)")
        torch.manual_seed(seed)
        lb = multivae_loss(pair, mv, x, observed, names)
        torch.manual_seed(seed)
        xp, obs = model.prepare(x, observed)
        mu, lv, _, private = model.encode(xp, obs)
        la, _ = model.objective.loss(mu, lv, model.log_lik(xp, obs, private), beta, observed=obs,
                                     ids=torch.zeros(B, dtype=torch.long), check=False)
    elif pair == "mmvaeplus":
        post, prior = [], []
        mv.post_dist, mv.prior_dist = _RecordingLaplace(post), _RecordingLaplace(prior)
        try:
            torch.manual_seed(seed)
            lb = multivae_loss(pair, mv, x, observed, names)
        finally:
            del mv.post_dist, mv.prior_dist
            from torch.distributions import Laplace
            mv.post_dist = mv.prior_dist = Laplace
        M = len(names)
        z = torch.stack(post[0::2]); w = torch.stack(post[1::2])                    # (M, K, B, D), (M, K, B, Dp)
        aux = torch.zeros(M, M, *w.shape[1:])
        it = iter(prior)
        for m in range(M):                                              # MultiVae's order: stratum, then targets
            for n in range(M):
                if n != m: aux[n, m] = next(it)
        xp, obs = model.prepare(x, observed)
        la, _ = model.objective.model_loss(model, xp, obs, beta, noise={"z": z, "w": w, "aux": aux})
    else:
        raise ValueError(f"pair {pair!r} has no loss check ({ESTIMATOR_NOTES.get(pair, '')})")
    la.backward(); lb.backward()
    fa, fb = float(la.detach()), float(lb.detach())
    out.update(mopoe=fa, multivae=fb, abs_diff=abs(fa - fb), rel_diff=abs(fa - fb) / max(abs(fb), 1e-30),
               grad_rel_gap=_grad_gap(_grads(pa), _grads(pb)))
    for p in pa + pb: p.grad = None
    with torch.no_grad():                                   # what mopoe computes with its own draw (nothing forced)
        torch.manual_seed(seed)
        out["mopoe_own_draw"] = float(model.loss(x, beta=beta, observed=observed)[0])
    return out


def not_comparable(pair: str, model, masked: bool) -> str | None:
    "Why the pair computes different losses by design in this setting (None: it should compute the same loss)."
    if pair == "mmvae": return "MMVAE: different estimators"
    if pair == "mvae" and masked: return "MVAE with masks: the unimodal ELBOs are weighed differently"
    if pair == "mvae" and any(w != 1.0 for w in model.rec_weights.values()):
        return ("MVAE with non-uniform reconstruction weights: MultiVae weighs the unimodal ELBOs' reconstructions "
                "too, mopoe (as the authors) does not")
    return None


def tolerance_ok(row: dict, rel: float = 1e-5, grad: float = 1e-3) -> bool:
    "The check's verdict: losses within `rel` relative, gradients within `grad` of the largest."
    return row["rel_diff"] <= rel and row["grad_rel_gap"] <= grad and math.isfinite(row["mopoe"])


def describe_assignment(M: int, B: int) -> SimpleNamespace:
    "MultiVae's complete-data block assignment for M modalities, batch B, from its own rule (no model needed)."
    K = 2 ** M - 1
    per = B // K
    return SimpleNamespace(subsets=K, rows_each=per, full_set=B - per * (K - 1), eq6=B / K)
