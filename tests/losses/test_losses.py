"""Loss terms: hand-computed values, and the gradient routing of docs/method.md sec. 2 for every
switch. A gradient "reaches" a parameter when it is non-zero; routing is checked term by
term with autograd, so a term that leaks into a parameter it must not touch fails here."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.losses.base import LOSS_TERMS, Objective
from gsae_pl.saes.base import build_sae
from tests.conftest import make_cfg


def _setup(*overrides, arch="gated", d_in=8, d_sae=16):
    cfg = make_cfg(f"sae.architecture={arch}", f"sae.d_sae={d_sae}", *overrides)
    sae = build_sae(cfg.sae, d_in)
    with torch.no_grad():  # move off the symmetric init so every path is live
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(64, d_in)
    return cfg, sae, x


def _reached(sae, value) -> set[str]:
    """Names of the parameters that receive a non-zero gradient from `value`."""
    params = dict(sae.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True,
                                retain_graph=True)
    return {name for (name, _), g in zip(params.items(), grads)
            if g is not None and g.abs().max() > 0}


def _terms(cfg, sae, x):
    x_hat, enc = sae(x)
    return Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)


KERNELS = ["reference", "dense", "sparse"]  # every path must route gradients the same way


@pytest.mark.parametrize("kernel", KERNELS)
def test_gated_paper_routing(kernel):
    cfg, sae, x = _setup(f"sae.kernel={kernel}")
    terms = _terms(cfg, sae, x)
    assert set(terms) == {"reconstruction", "sparsity", "aux"}
    recon = _reached(sae, terms["reconstruction"])
    assert recon == {"W_enc", "r_mag", "b_mag", "W_dec", "b_dec"}  # never b_gate
    assert _reached(sae, terms["sparsity"]) == {"W_enc", "b_gate", "b_dec"}
    # Frozen aux decoder: W_dec AND b_dec get nothing from L_aux... except b_dec through the
    # centring (x - b_dec) inside pi_gate, which the paper does not stop-gradient.
    aux = _reached(sae, terms["aux"])
    assert aux == {"W_enc", "b_gate", "b_dec"}
    assert "W_dec" not in aux


def test_frozen_aux_gives_b_dec_only_its_centring_gradient():
    """With the centring removed from the picture, frozen aux gives b_dec no gradient."""
    cfg, sae, x = _setup("sae.kernel=reference")
    x_hat, enc = sae(x)
    aux = Objective.from_config(cfg.loss).terms["aux"]
    enc_detached = enc._replace(gate_acts=enc.gate_acts.detach())
    value = aux.fn(x, x_hat, enc_detached, sae)
    assert not value.requires_grad  # nothing but the (frozen) decoder left to reach


def test_unfrozen_aux_decoder_reaches_W_dec_and_b_dec():
    cfg, sae, x = _setup("loss.aux.decoder=unfrozen", "sae.kernel=reference")
    x_hat, enc = sae(x)
    aux = Objective.from_config(cfg.loss).terms["aux"]
    assert _reached(sae, aux.fn(x, x_hat, enc._replace(gate_acts=enc.gate_acts.detach()), sae)) \
        == {"W_dec", "b_dec"}
    assert _reached(sae, _terms(cfg, sae, x)["aux"]) == {"W_enc", "b_gate", "b_dec", "W_dec"}


def test_unfrozen_decoder_with_frozen_b_dec_switch():
    cfg, sae, x = _setup("loss.aux.decoder=unfrozen", "loss.aux.b_dec=frozen",
                         "sae.kernel=reference")
    x_hat, enc = sae(x)
    aux = Objective.from_config(cfg.loss).terms["aux"]
    assert _reached(sae, aux.fn(x, x_hat, enc._replace(gate_acts=enc.gate_acts.detach()), sae)) \
        == {"W_dec"}


@pytest.mark.parametrize("kernel", KERNELS)
def test_aux_off_b_gate_gradient_comes_from_l1_alone(kernel):
    cfg, sae, x = _setup("loss.aux.enabled=false", f"sae.kernel={kernel}")
    terms = _terms(cfg, sae, x)
    assert set(terms) == {"reconstruction", "sparsity"}
    total = sum(terms.values())
    (g_total,) = torch.autograd.grad(total, [sae.b_gate], retain_graph=True)
    (g_l1,) = torch.autograd.grad(terms["sparsity"], [sae.b_gate])
    assert torch.equal(g_total, g_l1)
    assert (g_l1 >= 0).all() and g_l1.abs().max() > 0  # L1 only ever pushes gates shut


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sharing,expected", [
    ("r_mag", {"W_enc", "r_mag", "b_mag", "W_dec", "b_dec"}),
    ("no_r_mag", {"W_enc", "b_mag", "W_dec", "b_dec"}),
    ("untied", {"W_mag", "b_mag", "W_dec", "b_dec"}),
])
def test_reconstruction_routing_per_weight_sharing(sharing, expected, kernel):
    cfg, sae, x = _setup(f"sae.weight_sharing={sharing}", f"sae.kernel={kernel}")
    assert _reached(sae, _terms(cfg, sae, x)["reconstruction"]) == expected


def test_untied_gate_learns_only_from_sparsity_and_aux():
    cfg, sae, x = _setup("sae.weight_sharing=untied")
    terms = _terms(cfg, sae, x)
    assert "W_enc" in _reached(sae, terms["aux"]) and "W_mag" not in _reached(sae, terms["aux"])


def test_baseline_routing():
    cfg, sae, x = _setup("loss.aux.enabled=false", arch="relu")
    terms = _terms(cfg, sae, x)
    assert _reached(sae, terms["reconstruction"]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert _reached(sae, terms["sparsity"]) == {"W_enc", "b_enc", "b_dec"}


def test_term_values_by_hand():
    cfg, sae, x = _setup("loss.l1_coefficient=0.5", "sae.kernel=reference")
    x_hat, enc = sae(x)
    terms = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=0)
    d_in = x.shape[1]
    assert torch.allclose(terms["reconstruction"], ((x - x_hat) ** 2).sum(1).mean() / d_in)
    assert torch.allclose(terms["sparsity"], 0.5 * torch.relu(enc.pre_acts).sum(1).mean())
    x_aux = torch.relu(enc.pre_acts) @ sae.W_dec + sae.b_dec
    assert torch.allclose(terms["aux"], ((x - x_aux) ** 2).sum(1).mean() / d_in)


def test_decoder_norm_l1_weights_by_row_norm():
    cfg, sae, x = _setup("loss.sparsity.kind=decoder_norm_l1", "sae.unit_norm_decoder=false",
                         "loss.aux.decoder=unfrozen", "sae.kernel=reference")
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 17, dtype=torch.float32)[:, None])
    x_hat, enc = sae(x)
    value = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)["sparsity"]
    expected = cfg.loss.sparsity.coefficient * (enc.gate_acts * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(value, expected)
    assert "W_dec" in _reached(sae, value)


def test_l1_warmup_ramps_the_coefficient():
    cfg = make_cfg("loss.l1_coefficient=2.0", "loss.l1_warmup_steps=4")
    objective = Objective.from_config(cfg.loss)
    ramp = [objective.coefficients(s)["sparsity"] for s in range(6)]
    assert ramp == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert objective.coefficients(0)["reconstruction"] == 1.0


def test_disabled_terms_are_absent_and_terms_registry_matches_schema():
    cfg = make_cfg("loss.reconstruction.enabled=false", "loss.aux.enabled=false")
    assert set(Objective.from_config(cfg.loss).terms) == {"sparsity"}
    assert set(LOSS_TERMS.names()) == set(cfg.loss.keys())
