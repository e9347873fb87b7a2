"""ProLU (docs/method.md sec. 5): forward and the backward rules on hand-set values.

Hand-set SAE: d_in = d_sae = 3, W_enc = I, b_dec = 0, so m = x; b_enc = [0, -1, 2].
    x = m = [[0.5, 1.5, -1.0],      m + b_enc = [[0.5,  0.5, 1.0],
             [2.0, 0.5,  3.0]]                   [2.0, -0.5, 5.0]]
    gate  = 1[m > 0 and m + b > 0] = [[1, 1, 0], [1, 0, 1]]
    f     = m * gate               = [[0.5, 1.5, 0], [2, 0, 3]]
(feature 1 of row 0 keeps its full 1.5: the bias thresholds, never shifts; feature 2 of row 0
stays off although m + b > 0: a positive bias acts like 0.)
Upstream gradient G = dL/df = [[1, 2, 3], [4, 5, 6]] (L = sum(f * G)):
    relu  dL/dm = G*gate         = [[1, 2, 0], [4, 0, 6]]     dL/db = [5, 2, 6]
    ste   dL/dm = G*gate*(1 + m) = [[1.5, 5, 0], [12, 0, 24]] dL/db = G*gate*m summed
                                                            = [0.5+8, 3+0, 0+18] = [8.5, 3, 18]
    ste_bias  dL/dm as relu's, dL/db as ste's;   ste_m  dL/dm as ste's, dL/db as relu's
prolu_positive_bias=relu: features 0 (b = 0) and 2 (b = 2) are plain ReLUs, f = ReLU(m + b):
    f = [[0.5, 1.5, 1.0], [2, 0, 5]]          (feature 2 now shifted: 1 = -1 + 2, 5 = 3 + 2)
    their gradients ReLU's own: dL/dm = dL/d(m + b) = G * 1[m + b > 0] = [[1, ., 3], [4, ., 6]],
    dL/db = [5, ., 9]; feature 1 (b = -1) keeps the rule's: relu [2, 0] and 2, ste [5, 0] and 3.
"""

from __future__ import annotations

import pytest
import torch

from gsae_pl.losses.base import Objective
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.prolu import ProLUReLU, ProLUSAE, ProLUSTE, ProLUSTEBias, ProLUSTEM
from tests.conftest import make_cfg

X = torch.tensor([[0.5, 1.5, -1.0], [2.0, 0.5, 3.0]])
B_ENC = torch.tensor([0.0, -1.0, 2.0])
G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
F = torch.tensor([[0.5, 1.5, 0.0], [2.0, 0.0, 3.0]])
GRADS = {  # rule -> (dL/dm, dL/db_enc)
    "relu": (torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]]), torch.tensor([5.0, 2.0, 6.0])),
    "ste": (torch.tensor([[1.5, 5.0, 0.0], [12.0, 0.0, 24.0]]), torch.tensor([8.5, 3.0, 18.0])),
    "ste_bias": (torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]]),
                 torch.tensor([8.5, 3.0, 18.0])),
    "ste_m": (torch.tensor([[1.5, 5.0, 0.0], [12.0, 0.0, 24.0]]), torch.tensor([5.0, 2.0, 6.0])),
}
RULES = list(GRADS)
F_RELU_POSITIVE = torch.tensor([[0.5, 1.5, 1.0], [2.0, 0.0, 5.0]])
GRADS_RELU_POSITIVE = {  # rule -> (dL/dm, dL/db_enc) with prolu_positive_bias=relu
    "relu": (torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]]), torch.tensor([5.0, 2.0, 9.0])),
    "ste": (torch.tensor([[1.0, 5.0, 3.0], [4.0, 0.0, 6.0]]), torch.tensor([5.0, 3.0, 9.0])),
}


def _hand_set(rule: str, positive_bias: str = "prolu") -> ProLUSAE:
    sae = ProLUSAE(3, 3, prolu_backward=rule, prolu_positive_bias=positive_bias)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
        sae.b_enc.copy_(B_ENC)
    return sae


@pytest.mark.parametrize("rule", RULES)
def test_forward_matches_hand_computation(rule):
    x_hat, enc = _hand_set(rule)(X)
    assert torch.equal(enc.f, F)
    assert torch.equal(enc.gate_acts, enc.f)  # L1 on the outputs, like the baseline
    assert enc.fired.tolist() == [2, 1, 1]
    assert torch.equal(x_hat, F)  # identity decoder, b_dec = 0


@pytest.mark.parametrize("rule,function", [("relu", ProLUReLU), ("ste", ProLUSTE),
                                           ("ste_bias", ProLUSTEBias), ("ste_m", ProLUSTEM)])
def test_backward_rule_on_the_function(rule, function):
    m = X.clone().requires_grad_(True)
    b = B_ENC.clone().requires_grad_(True)
    (function.apply(m, b) * G).sum().backward()
    assert torch.equal(m.grad, GRADS[rule][0])
    assert torch.equal(b.grad, GRADS[rule][1])


@pytest.mark.parametrize("rule", RULES)
def test_backward_rule_through_the_sae(rule):
    """With W_enc = I and b_dec = 0: dL/dW_enc = x^T dL/dm, dL/db_dec = -(dL/dm summed) @ I."""
    sae = _hand_set(rule)
    _, enc = sae(X)
    (enc.f * G).sum().backward()
    grad_m, grad_b = GRADS[rule]
    assert torch.equal(sae.b_enc.grad, grad_b)
    assert torch.allclose(sae.W_enc.grad, X.t() @ grad_m)
    assert torch.allclose(sae.b_dec.grad, -grad_m.sum(0))


def test_rules_differ_only_in_backward():
    relu = _hand_set("relu")
    assert all(torch.equal(relu(X)[0], _hand_set(rule)(X)[0]) for rule in RULES)


@pytest.mark.parametrize("rule", ["relu", "ste"])
def test_a_non_negative_bias_makes_a_plain_relu(rule):
    """b_enc = 0 counts as non-negative: feature 0 takes ReLU's gradient under ste too."""
    sae = _hand_set(rule, positive_bias="relu")
    x_hat, enc = sae(X)
    assert torch.equal(enc.f, F_RELU_POSITIVE) and torch.equal(x_hat, F_RELU_POSITIVE)
    assert enc.fired.tolist() == [2, 1, 2]
    (enc.f * G).sum().backward()
    grad_m, grad_b = GRADS_RELU_POSITIVE[rule]
    assert torch.equal(sae.b_enc.grad, grad_b)
    assert torch.allclose(sae.W_enc.grad, X.t() @ grad_m)


def test_l1_raises_the_threshold_and_reaches_the_encoder():
    """The L1 term's gradient on b_enc is >= 0 (descent lowers b_enc: fewer features fire)."""
    cfg = make_cfg("sae.architecture=prolu", "sae.d_sae=16", "loss.aux.enabled=false")
    sae = build_sae(cfg.sae, 8)
    x = torch.randn(64, 8)
    x_hat, enc = sae(x)
    terms = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)
    assert set(terms) == {"reconstruction", "sparsity"}
    g_b, g_W = torch.autograd.grad(terms["sparsity"], [sae.b_enc, sae.W_enc])
    assert (g_b >= 0).all() and g_b.abs().max() > 0 and g_W.abs().max() > 0


def test_prolu_refuses_the_aux_term():
    from gsae_pl.errors import UserError
    with pytest.raises(UserError, match="loss.aux needs a gate"):
        make_cfg("sae.architecture=prolu")


def test_unknown_backward_rule_is_refused_with_the_choices():
    from gsae_pl.errors import UserError
    with pytest.raises(UserError, match="sae.prolu_backward=sign is not one of: relu, ste, "
                       "ste_bias, ste_m"):
        make_cfg("sae.architecture=prolu", "loss.aux.enabled=false", "sae.prolu_backward=sign")
