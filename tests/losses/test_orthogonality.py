"""Orthogonality regulariser (docs/method.md sec. 5): values on hand-set decoders, gradient to
inactive neighbours, ties averaged, never a d_sae x d_sae matrix, any architecture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gsae_pl.errors import UserError
from gsae_pl.losses.base import Objective
from gsae_pl.losses.orthogonality import nearest_neighbour_penalty
from gsae_pl.saes.base import build_sae
from tests.conftest import make_cfg

# Rows in 2-D, cosines by hand: cos(0,1) = 0.6, cos(0,2) = 0, cos(1,2) = -0.8. Row 2 has norm
# 3: the penalty reads directions only. Nearest by |cos|: 0 -> 1 (0.6), 1 -> 2 (0.8), 2 -> 1.
W_DEC = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -3.0]])


def _penalty(W, active, exponent=4.0, shape="power", eps=0.01):
    W = W.clone().requires_grad_(True)
    value = nearest_neighbour_penalty(W, torch.tensor(active), exponent, shape, eps)
    (grad,) = torch.autograd.grad(value, [W])
    return value, grad


@pytest.mark.parametrize("active,exponent,expected", [
    ([0], 4.0, 0.6**4),
    ([1], 4.0, 0.8**4),
    ([0, 1], 4.0, (0.6**4 + 0.8**4) / 2),  # averaged over the active features
    ([0, 1, 2], 2.0, (0.36 + 0.64 + 0.64) / 3),
])
def test_value_on_hand_set_decoder(active, exponent, expected):
    value, _ = _penalty(W_DEC, active, exponent)
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("active,exponent,eps,expected", [
    ([0], 4.0, 0.01, 0.6**4 / (0.4 + 0.01)),
    ([1], 4.0, 0.01, 0.8**4 / (0.2 + 0.01)),
    ([0, 1], 2.0, 0.1, (0.36 / 0.5 + 0.64 / 0.3) / 2),
])
def test_steep_shape_on_hand_set_decoder(active, exponent, eps, expected):
    value, _ = _penalty(W_DEC, active, exponent, "steep", eps)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_steep_shape_keeps_growing_where_the_power_levels_off():
    """Near a duplicate (|cos| = 0.99) the power's slope is ~p, the steep shape's ~1 / eps^2
    times larger; an exact duplicate costs 1 / eps with a finite gradient."""
    near = torch.tensor([[1.0, 0.0], [0.99, (1 - 0.99**2) ** 0.5], [0.0, 1.0]])
    power_value, power_grad = _penalty(near, [0])
    steep_value, steep_grad = _penalty(near, [0], shape="steep")
    assert steep_value.item() == pytest.approx(0.99**4 / 0.02, rel=1e-4)
    assert steep_grad[1].norm() > 100 * power_grad[1].norm()
    duplicate = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    value, grad = _penalty(duplicate, [0], shape="steep")
    assert value.item() == pytest.approx(100.0, rel=1e-4) and torch.isfinite(grad).all()


def test_steep_ties_are_averaged():
    tied = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    value, grad = _penalty(tied, [0], shape="steep")
    assert value.item() == pytest.approx(0.6**4 / 0.41, rel=1e-5)
    assert torch.allclose(grad[2], grad[1] * torch.tensor([1.0, -1.0]), atol=1e-7)


def _term_on_hand_set_decoder(*overrides):
    """The configured term, with only feature 0 active, on W_DEC's directions."""
    cfg = make_cfg("sae.d_sae=3", "loss.orthogonality.enabled=true", "loss.aux.enabled=false",
                   "sae.architecture=relu", *overrides)
    sae = build_sae(cfg.sae, 2)
    with torch.no_grad():
        sae.W_dec.copy_(W_DEC / W_DEC.norm(dim=1, keepdim=True))
    term = Objective.from_config(cfg.loss).terms["orthogonality"]
    enc = SimpleNamespace(fired=torch.tensor([5, 0, 0]))
    return sae, term.coefficient * term.fn(None, None, enc, sae)


def test_the_config_picks_the_shape():
    _, value = _term_on_hand_set_decoder("loss.orthogonality.shape=steep",
                                         "loss.orthogonality.eps=0.1")
    assert value.item() == pytest.approx(0.6**4 / 0.5, rel=1e-5)


def test_a_negative_coefficient_is_allowed_for_this_term_only():
    """It rewards alignment: descent turns the inactive neighbour TOWARDS the active row."""
    sae, value = _term_on_hand_set_decoder("loss.orthogonality.coefficient=-0.5")
    assert value.item() == pytest.approx(-0.5 * 0.6**4, rel=1e-5)
    (grad,) = torch.autograd.grad(value, [sae.W_dec])
    step = sae.W_dec[1].detach() - 0.1 * grad[1]
    assert (step / step.norm())[0] > 0.6
    with pytest.raises(UserError, match="loss.sparsity.coefficient=-0.5 must be >= 0"):
        make_cfg("loss.sparsity.coefficient=-0.5")
    with pytest.raises(UserError, match="loss.orthogonality.coefficient=nan must be a finite"):
        make_cfg("loss.orthogonality.coefficient=nan")
    with pytest.raises(UserError, match="loss.orthogonality.eps=0.0 must be > 0"):
        make_cfg("loss.orthogonality.eps=0")


def test_gradient_reaches_the_inactive_neighbour_only():
    """Only feature 0 is active; its neighbour row 1 is not, yet is pushed away from row 0."""
    _, grad = _penalty(W_DEC, [0])
    assert grad[1].abs().max() > 0  # the inactive nearest neighbour is updated
    assert grad[2].abs().max() == 0  # an inactive non-neighbour is not
    # Descent lowers cos(0, 1) = 0.6 > 0: row 1 turns away from row 0 (its x component drops).
    step = W_DEC[1] - 0.1 * grad[1]
    assert (step / step.norm())[0] < 0.6


def test_ties_are_averaged():
    """Rows 1 and 2 are both at |cos| 0.6 from row 0: each takes half the single-neighbour
    gradient, and row 0's pulls from them cancel across the x axis."""
    tied = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    single = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])  # row 2 orthogonal to row 0
    value_tied, grad_tied = _penalty(tied, [0])
    value_single, grad_single = _penalty(single, [0])
    assert value_tied.item() == pytest.approx(0.6**4, rel=1e-5)
    assert value_single.item() == pytest.approx(0.6**4, rel=1e-5)
    assert torch.allclose(grad_tied[1], 0.5 * grad_single[1], atol=1e-7)
    assert torch.allclose(grad_tied[2], grad_tied[1] * torch.tensor([1.0, -1.0]), atol=1e-7)
    assert grad_tied[0, 1].abs() < 1e-7


def test_no_active_feature_costs_nothing():
    value, grad = _penalty(W_DEC, [])
    assert value.item() == 0 and grad.abs().max() == 0


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, forward and backward."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_cost_never_a_d_sae_by_d_sae_matrix():
    d_sae, d_in, active = 4096, 8, torch.tensor([5, 700, 4000])
    W = torch.randn(d_sae, d_in, requires_grad=True)
    with _LargestTensor() as mode:
        value = nearest_neighbour_penalty(W, active, 4.0)
        value.backward()
    assert W.grad.abs().sum() > 0
    # [k, d_sae] and [d_sae, d_in] are the biggest: nothing near d_sae^2 = 16.8M entries.
    assert 0 < mode.largest <= d_sae * max(len(active), d_in)


@pytest.mark.parametrize("arch", ["relu", "gated", "prolu"])
def test_term_on_any_architecture_reaches_only_W_dec(arch):
    cfg = make_cfg(f"sae.architecture={arch}", "sae.d_sae=16",
                   f"loss.aux.enabled={arch == 'gated'}", "loss.orthogonality.enabled=true",
                   "loss.orthogonality.coefficient=0.5")
    sae = build_sae(cfg.sae, 8)
    x = torch.randn(64, 8)
    x_hat, enc = sae(x)
    value = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=0)["orthogonality"]
    active = torch.nonzero(enc.fired > 0).squeeze(1)
    assert 0 < active.numel()
    assert torch.allclose(value, 0.5 * nearest_neighbour_penalty(sae.W_dec, active, 4.0))
    params = dict(sae.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    reached = {n for n, g in zip(params, grads) if g is not None and g.abs().max() > 0}
    assert reached == {"W_dec"}


def test_off_by_default_and_exponent_must_be_super_linear():
    assert "orthogonality" not in Objective.from_config(make_cfg().loss).terms
    with pytest.raises(UserError, match="loss.orthogonality.exponent=1.0 must be > 1"):
        make_cfg("loss.orthogonality.exponent=1.0")


def _mean_nearest_cos(W):
    directions = W / W.norm(dim=1, keepdim=True)
    cos = (directions @ directions.t()).abs().fill_diagonal_(0)
    return cos.max(dim=1).values.mean().item()


@pytest.mark.slow
def test_switch_spreads_the_decoder_in_training():
    """The same short run with the term on ends with less similar nearest neighbours."""
    from gsae_pl.data.synthetic import SyntheticSource

    results = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        cfg = make_cfg("sae.d_sae=48", f"loss.orthogonality.enabled={enabled}",
                       "loss.orthogonality.coefficient=1.0", "data.synthetic.d_in=8",
                       "data.synthetic.n_features=32")
        source = SyntheticSource(cfg.data.synthetic)
        sae = build_sae(cfg.sae, 8)
        objective = Objective.from_config(cfg.loss)
        adam = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.0, 0.999))
        for step, x in zip(range(120), source.global_batches(128, 0)):
            x_hat, enc = sae(x)
            loss = sum(objective(x, x_hat, enc, sae, step).values())
            adam.zero_grad()
            loss.backward()
            sae.remove_parallel_grad()
            adam.step()
            sae.after_optimizer_step()
        results[enabled] = _mean_nearest_cos(sae.W_dec.detach())
    assert results[True] < results[False] - 0.05, results
