"""Switch combinations on every kernel path against plain autograd of the written formulas
(docs/method.md sec. 2): each term's value and each parameter's gradient, per term, at fp32
and float64, at a tiny width and at a realistic one (d_in 256, d_sae 2048, batch 512).

The formulas below are written out from the method, sharing no code with gsae_pl/losses or
gsae_pl/saes, so a path that drops a stop-gradient, a coefficient or a weight fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gsae_pl.config import load_config
from gsae_pl.losses.base import Objective
from gsae_pl.run.module import SAEModule
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.kernels import SparseCodes
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ["reference", "dense", "sparse"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
SIZES = [pytest.param((12, 48, 40), id="tiny"),
         pytest.param((256, 2048, 512), id="wide", marks=pytest.mark.slow)]
TOL = {torch.float32: 2e-4, torch.float64: 1e-9}
# Rows with a pre-activation this close to a kink (gate or magnitude ReLU at 0) are left out:
# there the fp32 paths may round to different sides, a discontinuity, not a wrong formula.
KINK_MARGIN = 1e-5
GATED = ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"]


# ---- the formulas, by hand ---------------------------------------------------------------
def mse(x, x_hat):
    return (x - x_hat).pow(2).sum(1).mean() / x.shape[1]  # ||.||^2 / d_in, batch mean


def pre_activations(P, x):
    x_cent = x - P["b_dec"]
    pre = x_cent @ P["W_enc"]
    return pre + P["b_gate"], pre * torch.exp(P["r_mag"]) + P["b_mag"]


def orthogonality_formula(W_dec, active, exponent, tie=1e-6):
    """Mean over active i of mean over i's nearest rows j (by |cos|, ties within `tie`) of
    |cos(W_dec[i], W_dec[j])|^exponent, from the full Gram matrix."""
    D = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = (D @ D.t()).abs()
    eye = torch.eye(len(D), dtype=torch.bool)
    with torch.no_grad():
        others = cos.masked_fill(eye, -1.0)
        nearest = (others >= others.max(1, keepdim=True).values - tie) & ~eye
    per_feature = (nearest * cos.pow(exponent)).sum(1) / nearest.sum(1)
    return per_feature[active].mean() if active.any() else W_dec.sum() * 0


def formula_terms(P, x, loss, step):
    """Each enabled term of the gated objective times its coefficient at `step`."""
    pi_gate, pi_mag = pre_activations(P, x)
    f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
    gate = torch.relu(pi_gate)
    terms = {}
    if loss.reconstruction.enabled:
        terms["reconstruction"] = loss.reconstruction.coefficient * mse(x, f @ P["W_dec"] +
                                                                       P["b_dec"])
    if loss.sparsity.enabled:
        weight = (P["W_dec"].norm(dim=1) if loss.sparsity.kind == "decoder_norm_l1"
                  else torch.ones_like(P["b_gate"]))
        warmup = loss.sparsity.warmup_steps
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        terms["sparsity"] = loss.sparsity.coefficient * ramp * (gate * weight).sum(1).mean()
    if loss.aux.enabled:  # sg() on whichever decoder half the switches freeze
        W = P["W_dec"] if loss.aux.decoder == "unfrozen" else P["W_dec"].detach()
        b_mode = loss.aux.b_dec or loss.aux.decoder
        b = P["b_dec"] if b_mode == "unfrozen" else P["b_dec"].detach()
        terms["aux"] = loss.aux.coefficient * mse(x, gate @ W + b)
    if loss.orthogonality.enabled:
        orth = loss.orthogonality
        terms["orthogonality"] = orth.coefficient * orthogonality_formula(
            P["W_dec"], (f > 0).any(0), orth.exponent)
    return terms


# ---- cases and comparisons ---------------------------------------------------------------
def perturbed_state(cfg, d_in, dtype, non_unit_decoder=False, stage2=False):
    """Off the symmetric init: ~1/6 of gates open, magnitudes of both signs."""
    sae = build_sae(cfg.sae, d_in).to(dtype)
    if stage2:
        sae.enter_stage2()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_((0.3 / d_in**0.5 if p.dim() == 2 else 0.3) * torch.randn_like(p))
        sae.b_gate.sub_(1.0)
        if non_unit_decoder:
            sae.W_dec.mul_(torch.rand(sae.d_sae, 1, dtype=dtype) + 0.5)
    return sae.state_dict()


def batch_off_kinks(state, d_in, rows, dtype):
    """`rows` random rows, none within KINK_MARGIN of a gate or an open magnitude's kink."""
    P = {k: v.double() for k, v in state.items() if k in GATED}
    x = torch.randn(rows * 2, d_in, dtype=torch.float64)
    pi_gate, pi_mag = pre_activations(P, x)
    near = (pi_gate.abs() < KINK_MARGIN) | ((pi_gate > 0) & (pi_mag.abs() < KINK_MARGIN))
    kept = x[~near.any(1)][:rows]
    assert len(kept) == rows
    return kept.to(dtype)


def leaves(state, frozen=()):
    return {k: v.clone().requires_grad_(k not in frozen) for k, v in state.items()
            if k in GATED}


def grads_of(value, params: dict) -> dict:
    """d value / d each parameter; an unreached parameter gets exact zeros."""
    wanted = {n: p for n, p in params.items() if p.requires_grad}
    found = torch.autograd.grad(value, list(wanted.values()), allow_unused=True,
                                retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(wanted.items(), found)}


def library_terms(cfg, state, x, step):
    sae = build_sae(cfg.sae, x.shape[1]).to(x.dtype)
    sae.load_state_dict(state)
    x_hat, enc = sae(x)
    return sae, x_hat, enc, Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step)


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    atol = tol * max(float(expected.detach().abs().max()), 1e-12)  # relative to the tensor's scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_matches_formula(cfg_for, state, x, step):
    """On every kernel path, each term's value and its gradient for every parameter equal
    the formula's."""
    dtype = x.dtype
    P = leaves(state)
    expected = formula_terms(P, x, cfg_for("reference").loss, step)
    expected_grads = {name: grads_of(value, P) for name, value in expected.items()}
    for kernel in KERNELS:
        sae, _, _, terms = library_terms(cfg_for(kernel), state, x, step)
        assert set(terms) == set(expected), kernel
        params = dict(sae.named_parameters())
        for name, value in terms.items():
            assert_close(value, expected[name], dtype, f"{kernel} {name} value")
            got = grads_of(value, params)
            for p_name, g in expected_grads[name].items():
                assert_close(got[p_name], g, dtype, f"{kernel} d{name}/d{p_name}")


def gated_cfg(d_sae, *overrides):
    return lambda kernel: make_cfg(f"sae.d_sae={d_sae}", f"sae.kernel={kernel}", *overrides)


# ---- the aux term's separate b_dec switch ------------------------------------------------
AUX_SWITCHES = {  # (loss.aux.decoder, loss.aux.b_dec) -> what L_aux's decoder half reaches
    ("frozen", "unfrozen"): {"b_dec"},
    ("unfrozen", "frozen"): {"W_dec"},
    ("frozen", None): set(),
    ("unfrozen", None): {"W_dec", "b_dec"},
}


def _detached(codes):
    if isinstance(codes, SparseCodes):
        return codes._replace(values=codes.values.detach())
    return codes.detach()


def _wide_only_for(cases, wide_cases):
    """(case, size) pairs: every case tiny, the listed ones also wide (slow)."""
    return [pytest.param(*case, size.values[0], marks=size.marks,
                         id="-".join(map(str, (*case, size.id))))
            for size in SIZES for case in cases
            if size.id == "tiny" or case in wide_cases]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoder,b_dec,size", _wide_only_for(
    list(AUX_SWITCHES), [("frozen", "unfrozen"), ("unfrozen", "frozen")]))
def test_aux_b_dec_switch_routes_the_aux_gradient(decoder, b_dec, size, dtype):
    d_in, d_sae, rows = size
    switches = [f"loss.aux.decoder={decoder}", f"loss.aux.b_dec={b_dec or 'null'}"]
    cfg_for = gated_cfg(d_sae, *switches)
    state = perturbed_state(cfg_for("reference"), d_in, dtype)
    x = batch_off_kinks(state, d_in, rows, dtype)
    assert_matches_formula(cfg_for, state, x, step=10**6)
    for kernel in KERNELS:  # the decoder half alone: the gate's activations held fixed
        sae, x_hat, enc, _ = library_terms(cfg_for(kernel), state, x, 0)
        aux = Objective.from_config(cfg_for(kernel).loss).terms["aux"]
        value = aux.fn(x, x_hat, enc._replace(gate_acts=_detached(enc.gate_acts)), sae)
        reached = ({n for n, g in grads_of(value, dict(sae.named_parameters())).items()
                    if g.abs().max() > 0} if value.requires_grad else set())
        assert reached == AUX_SWITCHES[decoder, b_dec], kernel


# ---- decoder-norm L1 as the shipped ablation runs it -------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_norm_l1_ablation_matches_the_formula(dtype, size):
    """ablations/decoder_norm_l1.yaml: norm-weighted L1, no unit-norm constraint, unfrozen
    aux decoder, here with decoder rows of norms 0.5..1.5."""
    d_in, d_sae, rows = size

    def cfg_for(kernel):
        return load_config(ROOT / "ablations/decoder_norm_l1.yaml",
                           ["data.source=synthetic", f"sae.d_sae={d_sae}",
                            f"sae.kernel={kernel}", "loss.l1_coefficient=0.3"])

    cfg = cfg_for("reference")
    assert (cfg.loss.sparsity.kind, cfg.loss.aux.decoder, cfg.sae.unit_norm_decoder) == \
        ("decoder_norm_l1", "unfrozen", False)
    state = perturbed_state(cfg, d_in, dtype, non_unit_decoder=True)
    norms = state["W_dec"].norm(dim=1)
    assert norms.max() - norms.min() > 0.5  # the weights in the penalty really differ
    assert_matches_formula(cfg_for, state, batch_off_kinks(state, d_in, rows, dtype), 10**6)


# ---- coefficients other than 1, the L1 warm-up, orthogonality -----------------------------
COEFFICIENTS = ["loss.l1_coefficient=0.3", "loss.l1_warmup_steps=10",
                "loss.reconstruction.coefficient=2.5", "loss.aux.coefficient=0.7",
                "loss.orthogonality.enabled=true", "loss.orthogonality.coefficient=0.2",
                "loss.orthogonality.exponent=3.0"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step,size", _wide_only_for([(3,), (50,)], [(3,)]))
def test_coefficients_and_l1_warmup_on_every_path(step, size, dtype):
    d_in, d_sae, rows = size
    cfg_for = gated_cfg(d_sae, *COEFFICIENTS)
    state = perturbed_state(cfg_for("reference"), d_in, dtype)
    x = batch_off_kinks(state, d_in, rows, dtype)
    assert_matches_formula(cfg_for, state, x, step)
    _, _, _, terms = library_terms(cfg_for("sparse"), state, x, step)
    ramp = 0.4 if step == 3 else 1.0  # (3 + 1) / 10 of the way
    P = leaves(state)
    gate = torch.relu(pre_activations(P, x)[0])
    assert_close(terms["sparsity"], 0.3 * ramp * gate.sum(1).mean(), dtype, "ramped L1")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [(), ("loss.aux.decoder=unfrozen",)], ids=["paper", "unfrozen"])
def test_orthogonality_on_every_path(extra, dtype, size):
    d_in, d_sae, rows = size
    cfg_for = gated_cfg(d_sae, "loss.orthogonality.enabled=true", *extra)
    state = perturbed_state(cfg_for("reference"), d_in, dtype)
    state["b_gate"][::3] = -1e3  # inactive features, whose rows may still be neighbours
    x = batch_off_kinks(state, d_in, rows, dtype)
    fired = library_terms(cfg_for("sparse"), state, x, 0)[2].fired
    assert 0 < int((fired > 0).sum()) < d_sae  # some features active, some not
    assert_matches_formula(cfg_for, state, x, step=0)


# ---- baseline + rescale & shift, stage 2 --------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_rescale_shift_stage2_trains_only_r_mag_and_b_mag(kernel, dtype, size):
    """Through SAEModule's own gradient handling: after backward and
    on_before_optimizer_step, only r_mag and b_mag hold a gradient, the formula's."""
    d_in, d_sae, rows = size
    cfg = make_cfg("sae.architecture=rescale_shift", "loss.aux.enabled=false",
                   f"sae.d_sae={d_sae}", f"sae.kernel={kernel}", "loss.l1_coefficient=0.3")
    state = perturbed_state(cfg, d_in, dtype, stage2=True)
    x = batch_off_kinks(state, d_in, rows, dtype)
    module = SAEModule(OmegaConf.to_container(cfg), d_in).to(dtype)
    module.sae.load_state_dict(state)
    assert module.sae.stage2
    x_hat, enc = module.sae(x)
    terms = module.objective(x, x_hat, enc, module.sae, step=0)
    loss = sum(terms.values()) + sum(0 * p.sum() for p in module.sae.frozen_parameters())
    loss.backward()
    module.on_before_optimizer_step(None)
    got = {n: p.grad for n, p in module.sae.named_parameters() if p.grad is not None}
    assert set(got) == {"r_mag", "b_mag"}
    P = leaves(state, frozen=("W_enc", "b_gate", "W_dec", "b_dec"))
    expected = grads_of(sum(formula_terms(P, x, cfg.loss, 0).values()), P)
    assert set(expected) == set(got)
    for name, g in expected.items():
        assert g.abs().max() > 0, name
        assert_close(got[name], g, dtype, f"{kernel} d loss / d {name}")


# ---- every gate shut ----------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("switches", [(), ("loss.aux.decoder=unfrozen",)],
                         ids=["paper", "unfrozen"])
def test_every_gate_shut(switches, dtype, size):
    """No active feature: x_hat is b_dec, every gradient finite, and only b_dec (the one
    parameter x_hat still reads) gets one, on every path."""
    d_in, d_sae, rows = size
    cfg_for = gated_cfg(d_sae, "loss.orthogonality.enabled=true", *switches)
    state = perturbed_state(cfg_for("reference"), d_in, dtype)
    state["b_gate"].fill_(-1e3)
    x = torch.randn(rows, d_in, dtype=dtype)
    b_dec = state["b_dec"]
    # Recon: d/d b_dec of ||x - b_dec||^2 / d_in, batch mean; aux adds as much if unfrozen.
    expected = -2 * (x - b_dec).mean(0) / d_in * (2 if switches else 1)
    for kernel in KERNELS:
        sae, x_hat, enc, terms = library_terms(cfg_for(kernel), state, x, 0)
        assert int(enc.fired.sum()) == 0, kernel
        assert torch.equal(x_hat, b_dec.expand_as(x)), kernel
        grads = grads_of(sum(terms.values()), dict(sae.named_parameters()))
        assert all(torch.isfinite(g).all() for g in grads.values()), kernel
        assert {n for n, g in grads.items() if g.abs().max() > 0} == {"b_dec"}, kernel
        assert_close(grads["b_dec"], expected, dtype, f"{kernel} b_dec")
        assert terms["orthogonality"].item() == 0.0 == terms["sparsity"].detach().item()
