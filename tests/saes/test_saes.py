"""Architectures: shapes and names of docs/method.md sec. 1, hand-set forward values, invariants."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.saes.base import ARCHITECTURES, build_sae
from gsae_pl.saes.gated import GatedSAE
from gsae_pl.saes.relu import ReLUSAE
from tests.conftest import make_cfg

# (architecture, variant): the variant is sae.weight_sharing, or sae.prolu_backward for prolu.
VARIANTS = [("relu", "r_mag"), ("gated", "r_mag"), ("gated", "no_r_mag"), ("gated", "untied"),
            ("prolu", "relu"), ("prolu", "ste"), ("rescale_shift", "r_mag")]


def _sae(arch, sharing, d_in=6, d_sae=10):
    field = "prolu_backward" if arch == "prolu" else "weight_sharing"
    cfg = make_cfg(f"sae.architecture={arch}", f"sae.{field}={sharing}",
                   f"sae.d_sae={d_sae}", "loss.aux.enabled=false")
    return build_sae(cfg.sae, d_in)


@pytest.mark.parametrize("arch,sharing", VARIANTS)
def test_parameter_names_and_shapes(arch, sharing):
    sae = _sae(arch, sharing)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes["W_enc"] == (6, 10) and shapes["W_dec"] == (10, 6) and shapes["b_dec"] == (6,)
    if arch in ("relu", "prolu"):
        assert set(shapes) == {"W_enc", "W_dec", "b_dec", "b_enc"}
    else:
        expected = {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag"}
        expected |= {"r_mag"} if sharing == "r_mag" else set()
        expected |= {"W_mag"} if sharing == "untied" else set()
        assert set(shapes) == expected
        assert tuple(sae.r_mag.shape) == (10,)  # a zero buffer when not learned


@pytest.mark.parametrize("arch,sharing", VARIANTS)
def test_init_unit_rows_and_encoder_transpose(arch, sharing):
    sae = _sae(arch, sharing)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10))
    assert torch.equal(sae.W_enc, sae.W_dec.t())


@pytest.mark.parametrize("arch,sharing", VARIANTS)
def test_unit_norm_constraint_projection_and_renormalisation(arch, sharing):
    sae = _sae(arch, sharing)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(10), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("arch,sharing", VARIANTS)
def test_outputs_non_negative_and_fired_counts_non_zero_codes(arch, sharing):
    sae = _sae(arch, sharing)
    with torch.no_grad():  # off the symmetric init, so some features fire and some do not
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x_hat, enc = sae(torch.randn(32, 6))
    f = enc.f  # dense: the gated auto kernel starts on the dense path
    assert x_hat.shape == (32, 6) and f.shape == (32, 10)
    assert (f >= 0).all() and 0 < (f > 0).float().mean() < 1
    assert torch.equal(enc.fired, (f != 0).sum(0))


def test_unit_norm_constraint_switch_off_leaves_decoder_alone():
    sae = ReLUSAE(4, 3, unit_norm_decoder=False)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad()
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((3,), 2.0))
    assert torch.equal(sae.W_dec.grad, g)


def _hand_set_gated(sharing="r_mag"):
    """d_in = 2, d_sae = 2, identity encoder: pre-activations are x - b_dec."""
    sae = GatedSAE(2, 2, weight_sharing=sharing)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
        sae.b_gate.copy_(torch.tensor([0.0, -1.0]))
        sae.b_mag.copy_(torch.tensor([0.25, 0.0]))
        if sharing == "r_mag":
            sae.r_mag.copy_(torch.log(torch.tensor([2.0, 1.0])))
    return sae


def test_gated_forward_matches_hand_computation():
    sae = _hand_set_gated()
    x = torch.tensor([[1.5, 0.5], [0.0, 2.0]])
    enc = sae.encode_reference(x)  # the path that materialises pi_gate and pi_mag
    # x - b_dec = [[1, .5], [-.5, 2]]; pi_gate = that + [0, -1] = [[1, -.5], [-.5, 1]]
    assert torch.allclose(enc.pre_acts, torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    # pi_mag = (x - b_dec) * exp(r_mag) + b_mag = [[2.25, .5], [-.75, 2]]
    assert torch.allclose(enc.pi_mag, torch.tensor([[2.25, 0.5], [-0.75, 2.0]]))
    # f = 1[pi_gate > 0] * ReLU(pi_mag): the gate closes feature 1 of row 0, feature 0 of row 1
    assert torch.allclose(enc.f, torch.tensor([[2.25, 0.0], [0.0, 2.0]]))
    assert torch.allclose(enc.gate_acts, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert enc.fired.tolist() == [1, 1]
    for kernel in ("dense", "sparse"):
        sae.kernel = kernel
        x_hat, fast = sae(x)
        assert torch.allclose(x_hat, torch.tensor([[2.75, 0.0], [0.5, 2.0]])), kernel
        assert torch.equal(fast.fired, enc.fired), kernel


def test_gated_with_sharing_is_a_jumprelu():
    """Appendix E: pi_mag = exp(r_mag) * pi_gate + theta, so the gate opens iff pi_mag > theta."""
    sae = _hand_set_gated()
    x = torch.randn(256, 2) * 3
    enc = sae.encode_reference(x)
    theta = sae.jumprelu_threshold()
    assert torch.equal(enc.pre_acts > 0, enc.pi_mag > theta)
    assert torch.allclose(enc.pi_mag - theta, torch.exp(sae.r_mag) * enc.pre_acts, atol=1e-6)


def test_untied_uses_its_own_magnitude_weights():
    sae = _hand_set_gated("untied")
    with torch.no_grad():
        sae.W_mag.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the inputs
    enc = sae.encode(torch.tensor([[1.5, 0.5]]))  # untied always takes the reference path
    assert torch.allclose(enc.pi_mag, torch.tensor([[0.75, 1.0]]))  # [.5, 1] + b_mag


def test_relu_forward_matches_hand_computation():
    sae = ReLUSAE(2, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5]))
    x_hat, enc = sae(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(enc.f, torch.tensor([[1.0, 1.5]]))
    assert torch.equal(enc.gate_acts, enc.f)
    assert torch.allclose(x_hat, torch.tensor([[1.0, 1.5]]))


@pytest.mark.parametrize("how", ["zeros", "mean", "geometric_median"])
def test_b_dec_init(how):
    sample = torch.cat([torch.zeros(9, 3), torch.full((1, 3), 100.0)])
    sae = ReLUSAE(3, 4)
    sae.init_b_dec(sample, how)
    expected = {"zeros": 0.0, "mean": 10.0, "geometric_median": 0.0}[how]
    assert torch.allclose(sae.b_dec, torch.full((3,), expected), atol=1e-3)


def test_registry_names():
    """Every shipped architecture is registered, first and in the declared order (a new
    file adds its own after these: CONTRIBUTING.md)."""
    shipped = ("relu", "gated", "prolu", "rescale_shift", "topk", "batchtopk", "jumprelu",
               "matryoshka_batchtopk")
    assert ARCHITECTURES.names()[:len(shipped)] == shipped
