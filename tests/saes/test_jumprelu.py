"""JumpReLU (docs/method.md sec. 1, arXiv 2407.14435): forward and pseudo-derivatives on
hand-set values, what the sparsity term sees, fp32 thresholds, refusals, and its ablation.

Hand-set pseudo-derivatives: eps = 0.25 (window |z - theta| < 0.125), theta = [0.5, 1.5],
    z = [[0.55, 1.80],      z - theta = [[ 0.05,  0.30],    K = [[1, 0],    H = [[1, 1],
         [0.45, 1.45],                   [-0.05, -0.05],         [1, 1],         [0, 0],
         [0.70, 1.30]]                   [ 0.20, -0.20]]         [0, 0]]         [1, 0]]
(row 0 feature 0 inside the window and firing, row 1 inside and silent, the rest outside).
Upstream G = [[1, 2], [3, 5], [5, 6]]:
    JumpReLU  f = z * H = [[0.55, 1.8], [0, 0], [0.7, 0]];  dL/dz = G * H = [[1, 2], [0, 0], [5, 0]]
              dL/dtheta = -(theta / eps) sum_rows K G = [-2 * (1 + 3), -6 * 5] = [-8, -30]
    Step      dL/dz = 0 (none);  dL/dtheta = -(1 / eps) sum_rows K G = [-4 * 4, -4 * 5] = [-16, -20]
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gsae_pl.errors import UserError
from gsae_pl.fit import main
from gsae_pl.losses.base import Objective
from gsae_pl.run.module import param_groups
from gsae_pl.run.resample import revive
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.jumprelu import JumpReLU, JumpReLUSAE, Step
from tests.conftest import make_cfg
from tests.tiny_run import TINY, metrics

YAML = Path(__file__).resolve().parents[2] / "ablations/jumprelu.yaml"
EPS = 0.25
Z = torch.tensor([[0.55, 1.8], [0.45, 1.45], [0.7, 1.3]])
THETA = torch.tensor([0.5, 1.5])
G = torch.tensor([[1.0, 2.0], [3.0, 5.0], [5.0, 6.0]])
JR = "sae.architecture=jumprelu"


def _through(function):
    z, theta = Z.clone().requires_grad_(True), THETA.clone().requires_grad_(True)
    out = function.apply(z, theta, EPS)
    (out * G).sum().backward()
    return out, z.grad, theta.grad


def test_jumprelu_forward_and_pseudo_derivatives():
    f, grad_z, grad_theta = _through(JumpReLU)
    assert torch.equal(f, torch.tensor([[0.55, 1.8], [0.0, 0.0], [0.7, 0.0]]))
    assert torch.equal(grad_z, torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 0.0]]))
    assert torch.equal(grad_theta, torch.tensor([-8.0, -30.0]))


def test_step_forward_and_pseudo_derivatives():
    h, grad_z, grad_theta = _through(Step)
    assert torch.equal(h, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert grad_z is None  # the L0 reaches the threshold only (the paper's estimator)
    assert torch.equal(grad_theta, torch.tensor([-16.0, -20.0]))


def _hand_set(penalty: str = "l0") -> JumpReLUSAE:
    """d_in = d_sae = 4, W_enc = W_dec = I, b_dec = 0, b_enc = [0, 0, 0, -1]."""
    sae = JumpReLUSAE(4, 4, jumprelu_penalty=penalty)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
        sae.threshold.copy_(torch.tensor([0.5, 1.0, 0.2, 0.1]))
    return sae


# z = x + b_enc = [[0.6, 0.9, -1, 1], [0.4, 1.5, 0.3, 1]]; fires where z > [0.5, 1, 0.2, 0.1]
X = torch.tensor([[0.6, 0.9, -1.0, 2.0], [0.4, 1.5, 0.3, 2.0]])
F = torch.tensor([[0.6, 0.0, 0.0, 1.0], [0.0, 1.5, 0.3, 1.0]])
H = (F != 0).float()


def test_forward_on_hand_set_weights():
    x_hat, enc = _hand_set()(X)
    assert torch.equal(enc.f, F)
    assert enc.fired.tolist() == [1, 1, 1, 2]
    assert torch.equal(x_hat, F)  # identity decoder, b_dec = 0
    assert torch.equal(enc.pre_acts, X + torch.tensor([0.0, 0.0, 0.0, -1.0]))


@pytest.mark.parametrize("penalty,want", [("l0", H), ("l1", F)])
def test_the_sparsity_term_sees_the_step_under_l0_and_f_under_l1(penalty, want):
    sae = _hand_set(penalty)
    _, enc = sae(X)
    assert torch.equal(enc.gate_acts, want)
    cfg = make_cfg(JR, "loss.aux.enabled=false", "loss.sparsity.coefficient=0.5",
                   f"sae.jumprelu_penalty={penalty}")
    x_hat, enc = sae(X)
    terms = Objective.from_config(cfg.loss)(X, x_hat, enc, sae, step=10**6)
    assert terms["sparsity"].item() == pytest.approx(0.5 * want.sum().item() / 2)  # mean row


def test_the_l0_term_moves_only_thresholds_and_the_l1_term_the_encoder_too():
    x = torch.randn(256, 4)
    for penalty, reaches_encoder in (("l0", False), ("l1", True)):
        sae = JumpReLUSAE(4, 8, bandwidth=0.5, jumprelu_penalty=penalty)  # eps = 1: wide
        x_hat, enc = sae(x)
        cfg = make_cfg(JR, "loss.aux.enabled=false", f"sae.jumprelu_penalty={penalty}")
        sparsity = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)["sparsity"]
        g_theta, g_W, g_b = torch.autograd.grad(sparsity, [sae.threshold, sae.W_enc, sae.b_enc],
                                                allow_unused=True)
        assert (g_theta <= 0).all() and g_theta.min() < 0  # descent raises the thresholds
        assert (g_W is not None and g_W.abs().max() > 0) == reaches_encoder
        assert (g_b is not None and g_b.abs().max() > 0) == reaches_encoder


def test_config_units_are_the_papers():
    """bandwidth and threshold_init are for E||x||^2 = 1: x sqrt(d_in) on gsae_pl's scale."""
    sae = JumpReLUSAE(16, 8, bandwidth=0.001, threshold_init=0.002)
    assert sae.eps == pytest.approx(0.004)
    assert torch.allclose(sae.threshold, torch.full((8,), 0.008))
    assert sae.threshold.dtype == torch.float32 and torch.equal(sae.b_enc, torch.zeros(8))
    assert torch.equal(sae.W_enc, sae.W_dec.t())  # the paper's init
    assert math.isclose(sae.initial_entry("threshold"), 0.008, rel_tol=1e-6)


def test_threshold_stays_fp32_and_compares_in_fp32_under_bf16():
    sae = JumpReLUSAE(4, 4, threshold_init=0.5)  # theta = 1 on gsae_pl's scale
    with torch.no_grad():
        sae.b_enc.fill_(1.001)  # 1.001 in fp32 fires over theta = 1; rounded to bf16, 1.0 not
    x = torch.zeros(3, 4)
    with torch.no_grad():  # b_dec = 0: z = 0 @ W_enc + b_enc
        sae.b_dec.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, enc = sae(x)
        loss = (x_hat - 1).pow(2).sum() + enc.gate_acts.sum()
    loss.backward()
    assert enc.fired.tolist() == [3, 3, 3, 3]
    assert enc.f.dtype == torch.float32
    assert sae.threshold.dtype == torch.float32 and sae.threshold.grad.dtype == torch.float32
    sae.to(torch.bfloat16)  # e.g. trainer.precision=bf16-true
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32


def test_the_step_projects_thresholds_onto_non_negative_values():
    sae = JumpReLUSAE(4, 3)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([-0.2, 0.0, 0.3]))
    sae.after_optimizer_step()  # SAEModule's after-step hook
    assert sae.threshold.tolist() == pytest.approx([0.0, 0.0, 0.3])


def test_a_resample_restarts_the_threshold_at_its_init():
    sae = JumpReLUSAE(4, 3, threshold_init=0.01)  # 0.02 here
    optimizer = torch.optim.Adam(sae.parameters())
    sae(torch.randn(8, 4))[0].pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.7, 0.8, 0.9]))
        optimizer.state[sae.threshold]["exp_avg"].fill_(1.0)
    dead = torch.tensor([True, False, True])
    revive(sae, optimizer, dead, torch.randn(2, 4), encoder_scale=0.2)
    assert sae.threshold.tolist() == pytest.approx([0.02, 0.8, 0.02])
    assert sae.b_enc[dead].abs().max() == 0
    moments = optimizer.state[sae.threshold]["exp_avg"]
    assert moments.tolist() == [0.0, 1.0, 0.0]


def test_refusals():
    with pytest.raises(UserError, match="loss.aux needs a gate"):
        make_cfg(JR)
    with pytest.raises(UserError, match="decoder_norm_l1 with sae.jumprelu_penalty=l0"):
        make_cfg(JR, "loss.aux.enabled=false", "loss.sparsity.kind=decoder_norm_l1",
                 "sae.unit_norm_decoder=false")
    make_cfg(JR, "loss.aux.enabled=false", "loss.sparsity.kind=decoder_norm_l1",
             "sae.unit_norm_decoder=false", "sae.jumprelu_penalty=l1")  # meaningful: accepted
    with pytest.raises(UserError, match="sae.bandwidth=0.0 must be > 0"):
        make_cfg(JR, "loss.aux.enabled=false", "sae.bandwidth=0.0")
    with pytest.raises(UserError, match="sae.threshold_init=-1.0 must be > 0"):
        make_cfg(JR, "loss.aux.enabled=false", "sae.threshold_init=-1.0")
    with pytest.raises(UserError, match="sae.jumprelu_penalty=l2 is not one of: l0, l1"):
        make_cfg(JR, "loss.aux.enabled=false", "sae.jumprelu_penalty=l2")


def test_build_sae_passes_its_fields():
    cfg = make_cfg(JR, "loss.aux.enabled=false", "sae.d_sae=6", "sae.bandwidth=0.5",
                   "sae.jumprelu_penalty=l1")
    sae = build_sae(cfg.sae, 4)
    assert isinstance(sae, JumpReLUSAE) and sae.eps == 1.0 and sae.jumprelu_penalty == "l1"


def _one_adam_step(sae, lr: float = 0.01) -> dict[str, torch.Tensor]:
    """Every parameter's change after one step of the run's optimiser on a loss whose
    gradient is 1 for every entry (Adam's first step moves each entry by lr x its group's
    scale, whatever the gradient's size)."""
    groups = param_groups(sae, lr)
    adam = torch.optim.Adam(groups, lr=lr)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    sum(p.sum() for p in sae.parameters()).backward()
    adam.step()
    return {name: before[name] - p.detach() for name, p in sae.named_parameters()}


def test_the_threshold_steps_sqrt_d_in_times_the_lr_by_default():
    """The stalled L0 (docs/RESULTS.md): theta lives on gsae_pl's scale, sqrt(d_in) times
    the paper's, so at the paper's lr it moves sqrt(d_in) times slower relative to z; its
    own lr x sqrt(d_in) restores the paper's dynamics. The rest keep the optimiser's lr."""
    moved = _one_adam_step(JumpReLUSAE(16, 8))
    assert torch.allclose(moved["threshold"], torch.full((8,), 0.04), rtol=1e-4)
    assert torch.allclose(moved["b_enc"], torch.full((8,), 0.01), rtol=1e-4)
    moved = _one_adam_step(JumpReLUSAE(16, 8, threshold_lr_scale=1.0))
    assert torch.allclose(moved["threshold"], torch.full((8,), 0.01), rtol=1e-4)


def test_param_groups_keep_one_group_when_nothing_is_scaled():
    assert len(param_groups(JumpReLUSAE(16, 8, threshold_lr_scale=1.0), 0.1)) == 1
    groups = param_groups(JumpReLUSAE(16, 8, threshold_lr_scale=2.0), 0.1)
    assert [len(g["params"]) for g in groups] == [4, 1] and groups[1]["lr"] == pytest.approx(0.2)
    cfg = make_cfg(JR, "loss.aux.enabled=false", "sae.threshold_lr_scale=3.0")
    assert build_sae(cfg.sae, 4).lr_scales() == {"threshold": 3.0}


@pytest.mark.slow
def test_its_ablation_trains(tmp_path):
    assert main(["--config", str(YAML), f"output.dir={tmp_path}", "output.name=run", *TINY,
                 "trainer.max_steps=20", "checkpoint.every_n_steps=20"]) == 0
    assert metrics(tmp_path, "run")["l0"] > 0
