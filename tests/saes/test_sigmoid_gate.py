"""The sigmoid gate (docs/method.md sec. 5): soft in training, hard in evaluation, the
reconstruction's gradient through the sigmoid, the L1 on the gate values, its soft FVU.

Hand-set SAE: d_in = d_sae = 2, W_enc = W_dec = I, b_dec = 0, r_mag = 0, b_mag = 0,
b_gate = [0, -1], T = 0.5; x = [[1, 2], [-1, 0.5]]:
    pi_gate = [[1, 1], [-1, -0.5]]        pi_mag = x
    gate    = sigmoid(pi_gate / T) = sigmoid([[2, 2], [-2, -1]])
    f soft  = gate * ReLU(pi_mag) = [[s(2), 2 s(2)], [0, 0.5 s(-1)]]
    f hard  = 1[pi_gate > 0] * ReLU(pi_mag) = [[1, 2], [0, 0]]
    fired   = [1, 1] in both modes (the hard support; soft f is also non-zero at (1, 1))
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gsae_pl.config import load_config
from gsae_pl.data.synthetic import SyntheticSource
from gsae_pl.errors import UserError
from gsae_pl.eval.base import EVALUATORS, EvalContext
from gsae_pl.losses.base import Objective
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.gated import GatedSAE
from tests.conftest import make_cfg
from tests.tiny_run import TINY, metrics

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "ablations/sigmoid_gate.yaml"
X = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
T = 0.5
s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
F_SOFT = torch.tensor([[s(2), 2 * s(2)], [0.0, 0.5 * s(-1)]])
F_HARD = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
GATE = torch.tensor([[s(2), s(2)], [s(-2), s(-1)]])


def _hand_set(sharing: str = "r_mag") -> GatedSAE:
    sae = GatedSAE(2, 2, gate="sigmoid", gate_temperature=T, weight_sharing=sharing)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.0, -1.0]))
    return sae


def test_soft_in_training_hard_in_evaluation():
    sae = _hand_set()
    x_hat, enc = sae.train()(X)
    torch.testing.assert_close(enc.f, F_SOFT)
    torch.testing.assert_close(x_hat, F_SOFT)  # identity decoder, b_dec = 0
    torch.testing.assert_close(enc.gate_acts, GATE)  # what the L1 penalty sees
    assert enc.fired.tolist() == [1, 1]
    x_hat, enc = sae.eval()(X)
    assert torch.equal(enc.f, F_HARD) and torch.equal(x_hat, F_HARD)
    torch.testing.assert_close(enc.gate_acts, GATE)
    assert enc.fired.tolist() == [1, 1]
    torch.testing.assert_close(sae.encode_reference(X, soft=True).f, F_SOFT)  # on request


def test_the_reconstruction_reaches_the_gate_through_the_sigmoid():
    """dL/db_gate = sum over rows of dL/df * ReLU(pi_mag) * s(1 - s) / T, s the gate value;
    dL/dW_enc = x^T (that on the gate, + dL/df * gate on the magnitude: W_mag = W_enc)."""
    sae = _hand_set()
    G = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    _, enc = sae(X)
    (enc.f * G).sum().backward()
    d_gate = G * X.clamp_min(0) * GATE * (1 - GATE) / T
    d_mag = G * GATE * (X > 0)
    torch.testing.assert_close(sae.b_gate.grad, d_gate.sum(0))
    torch.testing.assert_close(sae.b_mag.grad, d_mag.sum(0))
    torch.testing.assert_close(sae.W_enc.grad, X.t() @ (d_gate + d_mag))
    torch.testing.assert_close(sae.r_mag.grad, (d_mag * X).sum(0))  # pre * exp(0) = x


def _terms(*overrides):
    cfg = make_cfg("sae.gate=sigmoid", "loss.aux.enabled=false", "sae.d_sae=16",
                   "sae.gate_temperature=0.7", *overrides)
    sae = build_sae(cfg.sae, 8)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(32, 8)
    x_hat, enc = sae(x)
    return sae, x, enc, Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)


def _reached(sae, value):
    params = dict(sae.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True,
                                retain_graph=True)
    return {n for n, g in zip(params, grads) if g is not None and g.abs().max() > 0}


@pytest.mark.parametrize("kernel", ["auto", "dense", "sparse"])
def test_objective_penalises_the_gate_values_and_routes_on_every_kernel_setting(kernel):
    sae, x, enc, terms = _terms(f"sae.kernel={kernel}")
    assert set(terms) == {"reconstruction", "sparsity"}
    assert enc.pre_acts is not None  # the fast kernels do not know this gate: reference path
    gate = torch.sigmoid(((x - sae.b_dec) @ sae.W_enc + sae.b_gate) / 0.7)
    torch.testing.assert_close(terms["sparsity"], 0.05 * gate.sum(1).mean())
    assert _reached(sae, terms["reconstruction"]) == {"W_enc", "b_gate", "r_mag", "b_mag",
                                                      "W_dec", "b_dec"}
    assert _reached(sae, terms["sparsity"]) == {"W_enc", "b_gate", "b_dec"}


def test_the_aux_term_and_a_non_positive_temperature_are_refused():
    with pytest.raises(UserError, match="sae.gate=sigmoid .* set loss.aux.enabled=false"):
        make_cfg("sae.gate=sigmoid")
    with pytest.raises(UserError, match="sae.gate_temperature=0.0 must be > 0"):
        make_cfg("sae.gate=sigmoid", "loss.aux.enabled=false", "sae.gate_temperature=0")
    assert make_cfg().sae.gate == "heaviside"


def test_soft_gate_fvu_is_the_soft_reconstructions_on_the_held_out_rows():
    cfg = load_config(YAML, ["data.source=synthetic", "data.synthetic.d_in=8", "sae.d_sae=16",
                             "eval.rows=100", "data.batch_size=32"])
    source = SyntheticSource(cfg.data.synthetic)
    sae = build_sae(cfg.sae, 8).eval()
    ctx = EvalContext(sae=sae, norm_scale=torch.tensor(2.0), device=torch.device("cpu"),
                      rank=0, world_size=1, reduce_sum=lambda t: t, log_histogram=None)
    evaluator = EVALUATORS["soft_gate"](cfg.eval.soft_gate, cfg, 8, source)
    x = source.eval_rows(100) * 2.0
    with torch.no_grad():
        x_hat = sae.train()(x)[0]  # the soft reconstruction, by the training-mode forward
        sae.eval()
        want = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        hard = (x - sae(x)[0]).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    got = evaluator.compute(ctx)["fvu_soft_gate"]
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(got) - float(hard)) > 1e-3  # not the hard-gated FVU


def test_other_saes_have_no_soft_gate_fvu():
    cfg = make_cfg()
    ctx = SimpleNamespace(sae=build_sae(cfg.sae, 8))
    assert EVALUATORS["soft_gate"](cfg.eval.soft_gate, cfg, 8, None).compute(ctx) == {}


@pytest.mark.slow
def test_its_ablation_trains_and_reports_the_soft_fvu(tmp_path):
    from gsae_pl.fit import main

    assert main(["--config", str(YAML), f"output.dir={tmp_path}", "output.name=run", *TINY,
                 "trainer.max_steps=20", "eval.every_n_steps=20"]) == 0
    found = metrics(tmp_path, "run")
    assert found["l0"] > 0 and 0 < found["fvu_soft_gate"] < 10, found
