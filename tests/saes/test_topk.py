"""TopK SAE (docs/method.md sec. 1): hand-set forward, the sparse path against plain autograd,
its refusals, export form, and its ablation training and resuming with its buffers.

Hand-set SAE: d_in = d_sae = 4, W_enc = W_dec = I, b_dec = 0, b_enc = [0, 0, 0, -1], k = 2.
    x = [[ 3, -1,   2,  1],      z = [[ 3, -1,   2,  0],
         [-1, -2, 0.5, -3]]           [-1, -2, 0.5, -4]]
    row 0 keeps z = 3, 2;  row 1 keeps 0.5 and -1, and ReLU zeroes the -1:
    f = [[3, 0, 2, 0], [0, 0, 0.5, 0]],  fired = [1, 0, 2, 0],  x_hat = f (identity decoder)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsae_pl.errors import UserError
from gsae_pl.fit import main
from gsae_pl.losses.base import Objective
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.kernels import SparseCodes
from tests.conftest import make_cfg
from tests.tiny_run import TINY, metrics

ROOT = Path(__file__).resolve().parents[2]
SELECTION = ["loss.sparsity.enabled=false", "loss.aux.enabled=false"]
X = torch.tensor([[3.0, -1.0, 2.0, 1.0], [-1.0, -2.0, 0.5, -3.0]])
F = torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.5, 0.0]])


def dense(codes) -> torch.Tensor:
    return codes.csr().to_dense() if isinstance(codes, SparseCodes) else codes


def build(arch: str, *overrides: str, d_in: int = 4):
    cfg = make_cfg(f"sae.architecture={arch}", *SELECTION, *overrides)
    objective = Objective.from_config(cfg.loss)
    return build_sae(cfg.sae, d_in, reads=objective.reads), objective


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_forward_matches_hand_computation(kernel):
    sae, _ = build("topk", "sae.d_sae=4", "sae.k=2", f"sae.kernel={kernel}")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
    x_hat, enc = sae(X)
    assert isinstance(enc.f, SparseCodes) == (kernel == "auto")
    assert torch.equal(dense(enc.f), F) and torch.equal(x_hat, F)
    assert enc.fired.dtype == torch.int64 and enc.fired.tolist() == [1, 0, 2, 0]


def terms_and_grads(arch, kernel, overrides, x, state, train=True):
    sae, objective = build(arch, "sae.d_sae=48", f"sae.kernel={kernel}", *overrides,
                           d_in=x.shape[1])
    sae = sae.double()
    sae.load_state_dict(state)
    sae.train(train)
    x_hat, enc = sae(x)
    terms = objective(x, x_hat, enc, sae, step=10**6)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return x_hat, terms, grads, enc.fired, {n: b.clone() for n, b in sae.named_buffers()}


def assert_fast_matches_reference(arch, overrides, train=True):
    """Values, every loss term, every gradient, fired and the buffers, to float tolerance."""
    sae, _ = build(arch, "sae.d_sae=48", *overrides, d_in=12)
    sae = sae.double()
    with torch.no_grad():  # off the symmetric init; a third of the latents dead for AuxK
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.tokens_since_fired[::3] = 10**6
    state = sae.state_dict()
    x = torch.randn(40, 12, dtype=torch.float64)
    ref = terms_and_grads(arch, "reference", overrides, x, state, train)
    fast = terms_and_grads(arch, "auto", overrides, x, state, train)
    assert torch.allclose(fast[0], ref[0], atol=1e-12)
    assert set(fast[1]) == set(ref[1])
    for name in ref[1]:
        assert torch.allclose(fast[1][name], ref[1][name], atol=1e-12), name
    for name in ref[2]:
        assert torch.allclose(fast[2][name], ref[2][name], atol=1e-10), name
    assert torch.equal(fast[3], ref[3])
    for name in ref[4]:
        assert torch.equal(fast[4][name], ref[4][name]), name
    return ref


@pytest.mark.parametrize("auxk", [False, True])
def test_fast_path_matches_reference(auxk):
    ref = assert_fast_matches_reference(
        "topk", ("sae.k=5", f"loss.auxk.enabled={auxk}", "loss.auxk.dead_tokens=1000"))
    assert ("auxk" in ref[1]) == auxk and (not auxk or ref[1]["auxk"] > 0)
    assert 0 < int(ref[3].sum()) <= 40 * 5


def test_the_sparse_path_keeps_no_dense_code_and_a_term_reading_z_gets_it():
    sae, _ = build("topk", "sae.d_sae=16", "sae.k=3", "loss.auxk.enabled=true", d_in=4)
    _, enc = sae(torch.randn(5, 4))
    assert isinstance(enc.f, SparseCodes) and enc.f.values.numel() == 5 * 3
    assert enc.pre_acts.shape == (5, 16)  # AuxK reads z, on the fast path
    plain, _ = build("topk", "sae.d_sae=16", "sae.k=3", d_in=4)
    assert plain(torch.randn(5, 4))[1].pre_acts is None  # no reader: z is freed


@pytest.mark.parametrize("overrides,needle", [
    (["loss.aux.enabled=false"], "sets its sparsity by sae.k, not a penalty: set "
                                 "loss.sparsity.enabled=false"),
    (["loss.sparsity.enabled=false"], "loss.aux needs a gate"),
    ([*SELECTION, "sae.d_sae=8", "sae.k=9"], "sae.k=9 exceeds sae.d_sae=8"),
    ([*SELECTION, "sae.k=0"], "sae.k=0 must be > 0"),
])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_refusals_are_one_clear_line(arch, overrides, needle):
    with pytest.raises(UserError) as info:
        make_cfg(f"sae.architecture={arch}", *overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_saelens_form():
    from gsae_pl.saes.topk import TopKSAE

    sae, _ = build("topk", "sae.d_sae=6", "sae.k=2")
    weights = {f"sae.{n}": t for n, t in sae.state_dict().items()}
    out = TopKSAE.saelens_weights({"architecture": "topk", "k": 2}, weights)
    assert set(out) == {"W_enc", "b_enc", "W_dec", "b_dec"} and TopKSAE.saelens == "topk"
    assert TopKSAE.saelens_cfg({"k": 2})["k"] == 2


def train_and_resume(tmp_path, yaml: str) -> tuple[dict, dict]:
    """The ablation's 20-step fit, and the same fit resumed from its step-10 checkpoint:
    (the final state of each)."""
    run = ["--config", str(ROOT / f"ablations/{yaml}"), f"output.dir={tmp_path}", *TINY,
           "trainer.max_steps=20", "eval.every_n_steps=20", "data.batch_size=8", "sae.k=1",
           "loss.auxk.dead_tokens=40"]  # 8 rows, 1 latent each: most of the 32 miss a batch
    states = {}
    for name in ("whole", "resumed"):
        assert main([*run, f"output.name={name}"]) == 0
        assert metrics(tmp_path, name)["steps"] == 20
    ckpts = tmp_path / "resumed" / "checkpoints"
    for path in ckpts.iterdir():  # back to step 10: as if killed after its checkpoint
        if "step10" not in path.name:
            path.unlink()
    (tmp_path / "resumed" / "metrics.json").unlink()
    assert main([*run, "output.name=resumed"]) == 0
    for name in ("whole", "resumed"):
        last = next((tmp_path / name / "checkpoints").glob("*step20*"))
        states[name] = torch.load(last, weights_only=False)["state_dict"]
    return states["whole"], states["resumed"]


@pytest.mark.slow
def test_its_ablation_trains_and_resumes_with_its_dead_counts(tmp_path):
    whole, resumed = train_and_resume(tmp_path, "topk.yaml")
    counts = whole["sae.tokens_since_fired"]
    assert counts.dtype == torch.int64 and counts.max() > 0  # some latent missed a batch
    for name, value in whole.items():
        assert torch.allclose(resumed[name].double(), value.double(), atol=1e-6), name
