"""BatchTopK SAE (docs/method.md sec. 1): batch-level selection, the inference threshold,
the sparse path against plain autograd, DDP's global selection, export, and its ablation.

Hand-set SAE: d_in = d_sae = 3, W_enc = W_dec = I, b_dec = b_enc = 0 (so z = x), k = 1,
threshold_rate = 0.5. A batch of B = 2 rows keeps its k * B = 2 largest ReLU(z):
    batch 1  z = [[3, 2, 1], [0.5, -1, 0.2]]  keeps 3, 2 (row 0 keeps 2 features, row 1 none)
             m_1 = 2, theta := 2 (the first batch sets it)
    batch 2  z = [[1, 4, 0], [0, 0, 0.5]]     keeps 4, 1: m_2 = 1, theta := 2 + 0.5 (1 - 2) = 1.5
    batch 3  z <= 0 everywhere               keeps nothing: theta stays 1.5
    eval     f = z * 1[z > 1.5]: z = [1.6, 1.5, 3] -> [1.6, 0, 3]
"""

from __future__ import annotations

import pytest
import torch

from gsae_pl.saes import batchtopk as batchtopk_module
from gsae_pl.saes.batchtopk import BatchTopKSAE, batch_cut
from tests.saes.test_topk import assert_fast_matches_reference, build, dense, train_and_resume

BATCHES = [torch.tensor([[3.0, 2.0, 1.0], [0.5, -1.0, 0.2]]),
           torch.tensor([[1.0, 4.0, 0.0], [0.0, 0.0, 0.5]]),
           torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -3.0]])]


def hand_set(kernel: str = "auto") -> BatchTopKSAE:
    sae, _ = build("batchtopk", "sae.d_sae=3", "sae.k=1", "sae.threshold_rate=0.5",
                   f"sae.kernel={kernel}", d_in=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
    return sae


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_batch_level_selection_and_threshold_by_hand(kernel):
    sae = hand_set(kernel)
    _, enc = sae(BATCHES[0])
    assert torch.equal(dense(enc.f), torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    assert enc.fired.tolist() == [1, 1, 0]
    assert float(sae.threshold) == 2.0
    _, enc = sae(BATCHES[1])
    assert torch.equal(dense(enc.f), torch.tensor([[1.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    assert float(sae.threshold) == 1.5
    _, enc = sae(BATCHES[2])
    assert enc.fired.sum() == 0 and float(sae.threshold) == 1.5
    assert int(sae.threshold_batches) == 2
    sae.eval()
    _, enc = sae(torch.tensor([[1.6, 1.5, 3.0]]))
    assert torch.equal(dense(enc.f), torch.tensor([[1.6, 0.0, 3.0]]))
    assert float(sae.threshold) == 1.5  # evaluation leaves it alone


def test_forwards_without_a_graph_leave_the_state_alone():
    """The resampler's draws run the SAE in training mode under no_grad."""
    sae = hand_set()
    with torch.no_grad():
        sae(BATCHES[0])
    assert int(sae.threshold_batches) == 0 and int(sae.tokens_since_fired.sum()) == 0


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("auxk", [False, True])
def test_fast_path_matches_reference(auxk, train):
    overrides = ("sae.k=5", f"loss.auxk.enabled={auxk}", "loss.auxk.dead_tokens=1000")
    ref = assert_fast_matches_reference("batchtopk", overrides, train)
    if train:  # exactly k * B kept over the batch
        assert int(ref[3].sum()) == 5 * 40


def test_rows_keep_uneven_counts_summing_to_k_times_b():
    sae, _ = build("batchtopk", "sae.d_sae=32", "sae.k=4", d_in=8)
    _, enc = sae(torch.randn(16, 8) * torch.linspace(0.1, 3, 16)[:, None])
    per_row = (dense(enc.f) != 0).sum(1)
    assert int(per_row.sum()) == 4 * 16 and per_row.min() < 4 < per_row.max()


def test_two_processes_select_what_one_process_selects(monkeypatch):
    """Each process gathers the others' top k * B candidates: tau and m are the global
    batch's (simulated: the gather returns both halves' candidates, in rank order)."""
    z = torch.randn(8, 20)
    budget = 3 * 8
    tau, m = batch_cut(z, budget)  # one process
    halves = z[:4], z[4:]
    candidates = [torch.topk(torch.relu(h).flatten(), budget).values for h in halves]
    monkeypatch.setattr(batchtopk_module, "all_gather_cat", lambda t: torch.cat(candidates))
    for half in halves:
        assert batch_cut(half, budget) == (tau, m)
    assert int(((z >= tau) & (z > 0)).sum()) == budget


def test_saelens_form_puts_theta_on_every_feature():
    sae = hand_set()
    sae(BATCHES[0])
    weights = {f"sae.{n}": t for n, t in sae.state_dict().items()}
    out = BatchTopKSAE.saelens_weights({"architecture": "batchtopk"}, weights)
    assert BatchTopKSAE.saelens == "jumprelu"
    assert set(out) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert torch.equal(out["threshold"], torch.full((3,), 2.0))


@pytest.mark.slow
def test_its_ablation_trains_and_resumes_with_its_threshold(tmp_path):
    whole, resumed = train_and_resume(tmp_path, "batchtopk.yaml")
    assert int(whole["sae.threshold_batches"]) == 20 and float(whole["sae.threshold"]) > 0
    for name, value in whole.items():
        assert torch.allclose(resumed[name].double(), value.double(), atol=1e-6), name
