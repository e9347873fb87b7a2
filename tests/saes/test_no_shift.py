"""No shift (docs/method.md sec. 5): b_mag := exp(r_mag) * b_gate, tied, so the JumpReLU
threshold is 0 and f = exp(r_mag) * ReLU(pi_gate): values, gradients on every kernel, export.

Hand-set SAE: d_in = d_sae = 2, W_enc = W_dec = I, b_dec = 0, r_mag = log 2, b_gate = [0.5, -1];
x = [[1, 2], [-1, 0.5]]:
    pi_gate = [[1.5, 1], [-0.5, -0.5]]     f = 2 * ReLU(pi_gate) = [[3, 2], [0, 0]]
With L = sum(f * G): dL/db_gate = sum over rows of 2 G 1[pi_gate > 0] (b_mag's share, through
the tie; the Heaviside gate passes none), dL/dr_mag = sum over rows of G * f.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gsae_pl import load_sae
from gsae_pl.config import load_config
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.gated import GatedSAE
from tests.tiny_run import TINY

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "ablations/no_shift.yaml"
X = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
G = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
F = torch.tensor([[3.0, 2.0], [0.0, 0.0]])


def _hand_set(kernel: str = "reference") -> GatedSAE:
    sae = GatedSAE(2, 2, weight_sharing="no_shift", kernel=kernel)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.r_mag.fill_(math.log(2.0))
        sae.b_gate.copy_(torch.tensor([0.5, -1.0]))
    return sae


@pytest.mark.parametrize("kernel", ["reference", "dense", "sparse"])
def test_values_and_gradients_by_hand(kernel):
    sae = _hand_set(kernel)
    assert "b_mag" not in dict(sae.named_parameters())
    torch.testing.assert_close(sae.jumprelu_threshold(), torch.zeros(2))
    x_hat, enc = sae(X)
    f = enc.f if kernel != "sparse" else enc.f.csr().to_dense()
    torch.testing.assert_close(f, F)
    assert enc.fired.tolist() == [1, 1]
    (x_hat * G).sum().backward()  # identity decoder: dL/df = G
    torch.testing.assert_close(sae.b_gate.grad, torch.tensor([2.0, -4.0]))
    torch.testing.assert_close(sae.r_mag.grad, (G * F).sum(0))
    torch.testing.assert_close(sae.W_enc.grad, X.t() @ (2 * G * (F > 0)))


def test_kernels_match_the_reference_off_the_hand_set_point():
    torch.manual_seed(0)
    sae = GatedSAE(6, 20, weight_sharing="no_shift", kernel="reference")
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(16, 6)
    results = {}
    for kernel in ("reference", "dense", "sparse"):
        sae.kernel = kernel
        sae.zero_grad()
        x_hat, enc = sae(x)
        loss = (x - x_hat).pow(2).mean() + enc.gate_acts.csr().to_dense().sum() \
            if kernel == "sparse" else (x - x_hat).pow(2).mean() + enc.gate_acts.sum()
        loss.backward()
        results[kernel] = (x_hat.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    ref_x_hat, ref_grads = results["reference"]
    for kernel in ("dense", "sparse"):
        x_hat, grads = results[kernel]
        torch.testing.assert_close(x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_its_ablation_trains_without_the_aux_term():
    cfg = load_config(YAML)
    assert cfg.sae.weight_sharing == "no_shift" and not cfg.loss.aux.enabled
    assert build_sae(cfg.sae, 4).r_mag.requires_grad


@pytest.mark.slow
def test_export_holds_the_tied_b_mag_and_computes_the_same(tmp_path):
    from gsae_pl.fit import main as fit_main
    from gsae_pl.run.module import SAEModule
    from gsae_pl.saelens import main as export_main

    assert fit_main(["--config", str(YAML), f"output.dir={tmp_path}", "output.name=run", *TINY,
                     "trainer.max_steps=20", "loss.sparsity.coefficient=0.01"]) == 0
    assert export_main([str(tmp_path / "run"), str(tmp_path / "sae")]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    module = SAEModule(ckpt["hyper_parameters"]["cfg"], ckpt["hyper_parameters"]["d_in"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    stored = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    sae = module.sae
    torch.testing.assert_close(stored["b_mag"], (torch.exp(sae.r_mag) * sae.b_gate).detach())
    x = torch.randn(64, 8).abs() * 3
    with torch.no_grad():
        x_hat, enc = module(x)
        loaded = load_sae(tmp_path / "sae")
        assert (enc.f != 0).any()
        torch.testing.assert_close(loaded.encode(x), enc.f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), x_hat / module.norm_scale, rtol=1e-5, atol=1e-5)
