"""The fast gated paths (saes/kernels.py) against the plain-autograd reference: the same
loss terms, the same gradients for every parameter, to float tolerance."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.losses.base import Objective
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.kernels import Pattern, SparseCodes, decode_sparse
from tests.conftest import make_cfg

SWITCHES = [(), ("loss.aux.decoder=unfrozen",), ("sae.weight_sharing=no_r_mag",),
            ("loss.aux.enabled=false",),
            ("loss.sparsity.kind=decoder_norm_l1", "sae.unit_norm_decoder=false",
             "loss.aux.decoder=unfrozen")]  # config_checks refuses it with a frozen one


def _terms_and_grads(kernel, overrides, x, state):
    cfg = make_cfg("sae.d_sae=48", f"sae.kernel={kernel}", *overrides)
    sae = build_sae(cfg.sae, x.shape[1]).double()
    sae.load_state_dict(state)
    x_hat, enc = sae(x)
    terms = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return x_hat, terms, grads, enc.fired


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: ",".join(o) or "paper")
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_fast_paths_match_reference(kernel, overrides):
    cfg = make_cfg("sae.d_sae=48", *overrides)
    sae = build_sae(cfg.sae, 12).double()
    with torch.no_grad():  # off the symmetric init, some gates shut, some magnitudes < 0
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = sae.state_dict()
    x = torch.randn(40, 12, dtype=torch.float64)
    ref = _terms_and_grads("reference", overrides, x, state)
    fast = _terms_and_grads(kernel, overrides, x, state)
    assert torch.allclose(fast[0], ref[0], atol=1e-12)
    for name in ref[1]:
        assert torch.allclose(fast[1][name], ref[1][name], atol=1e-12), name
    assert set(fast[2]) == set(ref[2])
    for name in ref[2]:
        assert torch.allclose(fast[2][name], ref[2][name], atol=1e-10), name
    assert torch.equal(fast[3], ref[3])
    assert 0 < int(ref[3].sum()) < 40 * 48  # the test exercises both open and shut gates


def test_sparse_decode_matches_dense_product():
    dense = torch.relu(torch.randn(6, 10, dtype=torch.float64) - 0.8)
    row, col = dense.nonzero().unbind(1)
    codes = SparseCodes(Pattern(row, col, 6, 10), dense[row, col].clone().requires_grad_())
    W = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)
    out = decode_sparse(codes, W, b)
    assert torch.allclose(out, dense @ W + b)
    g = torch.randn(6, 4, dtype=torch.float64)
    out.backward(g)
    assert torch.allclose(W.grad, dense.t() @ g)
    assert torch.allclose(codes.values.grad, (g @ W.t())[dense != 0])


def test_auto_switches_to_sparse_when_few_features_fire():
    cfg = make_cfg("sae.d_sae=64")
    sae = build_sae(cfg.sae, 8)
    x = torch.randn(32, 8)
    assert sae.path_for(x) == "dense"  # nothing measured yet
    with torch.no_grad():
        sae.b_gate.fill_(-100.0)  # every gate shut
    sae.encode(x)
    assert sae.last_density == 0.0 and sae.path_for(x) == "sparse"
    with torch.no_grad():
        sae.b_gate.fill_(100.0)
    sae.encode(x)
    assert sae.path_for(x) == "dense"


def test_relu_fast_path_matches_reference():
    x = torch.randn(40, 12, dtype=torch.float64)
    overrides = ("sae.architecture=relu", "loss.aux.enabled=false")
    cfg = make_cfg("sae.d_sae=48", *overrides)
    sae = build_sae(cfg.sae, 12).double()
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn_like(sae.b_enc))
    state = sae.state_dict()
    ref = _terms_and_grads("reference", overrides, x, state)
    fast = _terms_and_grads("auto", overrides, x, state)
    assert torch.allclose(fast[0], ref[0], atol=1e-12)
    for name in ref[2]:
        assert torch.allclose(fast[2][name], ref[2][name], atol=1e-10), name
    assert torch.equal(fast[3], ref[3])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gated", "relu"])
def test_compiled_pointwise_matches_eager(arch):
    """torch.compile fuses the pointwise maths; it must compute the same thing."""
    x = torch.randn(64, 16)
    overrides = (f"sae.architecture={arch}", f"loss.aux.enabled={arch == 'gated'}")
    cfg = make_cfg("sae.d_sae=32", *overrides)
    state = build_sae(cfg.sae, 16).state_dict()
    results = []
    for mode in ("never", "always"):
        cfg = make_cfg("sae.d_sae=32", "sae.kernel=dense", f"sae.compile={mode}", *overrides)
        sae = build_sae(cfg.sae, 16)
        sae.load_state_dict(state)
        x_hat, enc = sae(x)
        sum(Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=0).values()).backward()
        results.append((x_hat, {n: p.grad for n, p in sae.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-4, rtol=1e-4), name


def test_bf16_autocast_runs_and_keeps_fp32_masters():
    cfg = make_cfg("sae.d_sae=64", "sae.kernel=dense")
    sae = build_sae(cfg.sae, 16)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, enc = sae(x)
        loss = sum(Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=0).values())
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in sae.parameters())
    ref_hat, _ = sae(x)
    assert torch.allclose(x_hat.float(), ref_hat, atol=0.1, rtol=0.05)
