"""Matryoshka BatchTopK SAE (docs/method.md sec. 1): the nested losses by hand, what each level
reaches, the sparse path against plain autograd, its refusals, export form, and its ablation.

Hand-set SAE: d_in = d_sae = 4, W_enc = I, b_enc = b_dec = 0 (so z = x), k = 2, a batch of
one row x = [3, 2, 1, 0.5]: BatchTopK keeps its 2 largest, f = [3, 2, 0, 0]. Decoder rows
d_0 = [1, 0, 0, 0], d_1 = [0, 1, 0, 0], d_2 = d_3 = [0, 0, 1, 0]; inner widths [1, 2]:
    level m = 1: x_hat = [3, 0, 0, 0],  ||x - x_hat||^2 / 4 = (4 + 1 + 0.25) / 4 = 1.3125
    level m = 2: x_hat = [3, 2, 0, 0],  (1 + 0.25) / 4 = 0.3125
    L_matryoshka = 1.625; the outer level (reconstruction term) is the m = 2 value again.
"""

from __future__ import annotations

import pytest
import torch

from gsae_pl.errors import UserError
from tests.conftest import make_cfg
from tests.saes.test_topk import (
    SELECTION,
    assert_fast_matches_reference,
    build,
    train_and_resume,
)

MATRYOSHKA = ("loss.matryoshka.enabled=true",)
X = torch.tensor([[3.0, 2.0, 1.0, 0.5]])


def hand_set(kernel: str):
    sae, objective = build("matryoshka_batchtopk", *MATRYOSHKA, "sae.d_sae=4", "sae.k=2",
                           "sae.matryoshka_widths=[1,2]", f"sae.kernel={kernel}")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                      [0, 0, 1, 0]]))
    return sae, objective


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_nested_losses_by_hand(kernel):
    sae, objective = hand_set(kernel)
    x_hat, enc = sae(X)
    terms = objective(X, x_hat, enc, sae, step=0)
    assert sae.inner_widths == (1, 2)
    assert float(terms["matryoshka"]) == pytest.approx(1.625)
    assert float(terms["reconstruction"]) == pytest.approx(0.3125)


def test_a_level_reaches_only_its_prefix():
    """The m = 1 level's gradient: decoder row 0 and b_dec only, none for rows 1-3."""
    sae, _ = build("matryoshka_batchtopk", *MATRYOSHKA, "sae.d_sae=4", "sae.k=2",
                   "sae.matryoshka_widths=[1]")
    x = torch.randn(8, 4)
    _, enc = sae(x)
    from gsae_pl.losses.matryoshka import matryoshka_loss

    matryoshka_loss(x, None, enc, sae).backward()
    assert sae.W_dec.grad[1:].abs().sum() == 0 and sae.W_dec.grad[0].abs().sum() > 0
    assert sae.b_dec.grad.abs().sum() > 0


def test_fast_path_matches_reference():
    assert_fast_matches_reference("matryoshka_batchtopk",
                                  (*MATRYOSHKA, "sae.k=5", "sae.matryoshka_widths=[6,24]",
                                   "loss.auxk.enabled=true", "loss.auxk.dead_tokens=1000"))


def test_default_widths_grow_four_fold():
    sae, _ = build("matryoshka_batchtopk", *MATRYOSHKA, "sae.d_sae=512")
    assert sae.inner_widths == (8, 32, 128)


@pytest.mark.parametrize("overrides,needle", [
    (("sae.matryoshka_widths=[4,2]", *MATRYOSHKA), "must increase strictly"),
    (("sae.matryoshka_widths=[8,64]", *MATRYOSHKA), "must increase strictly"),
    ((), "set loss.matryoshka.enabled=true"),
])
def test_refusals_are_one_clear_line(overrides, needle):
    with pytest.raises(UserError) as info:
        make_cfg("sae.architecture=matryoshka_batchtopk", "sae.d_sae=64", *SELECTION,
                 *overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_term_needs_nested_prefixes():
    with pytest.raises(UserError, match="loss.matryoshka needs nested prefixes"):
        make_cfg("sae.architecture=topk", *SELECTION, *MATRYOSHKA)


def test_saelens_form_is_jumprelu_with_its_threshold():
    from gsae_pl.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE

    sae, _ = hand_set("auto")
    sae(X)  # one training batch sets the threshold: the smallest kept activation, 2
    weights = {f"sae.{n}": t for n, t in sae.state_dict().items()}
    out = MatryoshkaBatchTopKSAE.saelens_weights({"architecture": "matryoshka_batchtopk"},
                                                 weights)
    assert MatryoshkaBatchTopKSAE.saelens == "jumprelu"
    assert torch.equal(out["threshold"], torch.full((4,), 2.0))


@pytest.mark.slow
def test_its_ablation_trains_and_resumes(tmp_path):
    whole, resumed = train_and_resume(tmp_path, "matryoshka_batchtopk.yaml")
    for name, value in whole.items():
        assert torch.allclose(resumed[name].double(), value.double(), atol=1e-6), name
