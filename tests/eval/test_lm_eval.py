"""Loss recovered (docs/method.md): 1 for a perfect reconstruction, 0 for zeros; its
standard error, clustered by held-out document, against hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.eval import lm_eval
from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_lm")
    return build_lm_source(lm_cfg(write_tiny_gpt2(root / "model"), write_text(root / "corpus"),
                                 "eval.loss_recovered.contexts=12"))


def test_perfect_reconstruction_recovers_everything_and_zeros_nothing(lm):
    tokens = lm.heldout_tokens(4)
    perfect = lm_eval.loss_recovered(lm_eval.ce_sums(lm, tokens, lambda x: x.clone()))
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["delta_lm_loss"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["ce_zero"] != pytest.approx(perfect["ce_clean"])
    zeros = lm_eval.loss_recovered(lm_eval.ce_sums(lm, tokens, torch.zeros_like))
    assert zeros["loss_recovered"] == pytest.approx(0.0, abs=1e-9)


def test_clean_ce_is_the_models_own_loss(lm):
    tokens = lm.heldout_tokens(4)
    metrics = lm_eval.loss_recovered(lm_eval.ce_sums(lm, tokens, lambda x: x))
    with torch.no_grad():
        assert metrics["ce_clean"] == pytest.approx(float(lm.bridge(tokens, return_type="loss")),
                                                    rel=1e-5)


def test_raw_scale_reconstruction_through_the_module(lm):
    """The module splices x_hat / norm_scale: an SAE that returns its (scaled) input
    exactly must recover all of the loss whatever the normalisation scalar."""
    from gsae_pl.run.module import SAEModule
    from tests.conftest import make_cfg

    cfg = make_cfg("eval.loss_recovered.contexts=12", "eval.rows=64")  # >1 document
    module = SAEModule(dict(cfg), lm.d_in, source=lm)
    module.norm_scale.fill_(3.7)
    module.sae.forward = lambda x: (x, None)
    metrics = module.evaluators["loss_recovered"].compute(module.eval_context())
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert set(metrics) == {"ce_clean", "ce_spliced", "ce_zero", "loss_recovered",
                            "delta_lm_loss", "loss_recovered_se", "delta_lm_loss_se"}


# Per-window mean CE (clean, spliced, zero) of 4 hand-made windows.
WINDOWS = [[3.0, 3.5, 5.0], [2.0, 2.25, 4.5], [4.0, 4.75, 6.0], [3.0, 3.3, 5.5]]


def _w(windows):
    return torch.tensor(windows, dtype=torch.float64)


def _hand_se(windows):
    """The standard errors by hand: plain numpy over windows, the delta method written out."""
    import numpy as np

    w = np.array(windows)
    n = len(w)
    c, s, z = w.mean(0)
    lr = (z - s) / (z - c)
    delta_se = np.std(w[:, 1] - w[:, 0], ddof=1) / np.sqrt(n)
    # the linearised ratio per window: its sample SD over sqrt(n) is the delta-method SE
    linear = (lr * w[:, 0] - w[:, 1] + (1 - lr) * w[:, 2]) / (z - c)
    return lr, delta_se, np.std(linear, ddof=1) / np.sqrt(n)


def test_standard_errors_match_a_hand_computed_example():
    sums = lm_eval.window_sums(_w(WINDOWS), tokens_per_window=10)
    metrics = lm_eval.loss_recovered(sums)
    lr, delta_se, lr_se = _hand_se(WINDOWS)
    # means: clean 3.0, spliced 3.45, zero 5.25 -> loss recovered 1.8 / 2.25 = 0.8
    assert metrics["loss_recovered"] == pytest.approx(0.8) == pytest.approx(lr)
    assert metrics["delta_lm_loss"] == pytest.approx(0.45)
    assert metrics["delta_lm_loss_se"] == pytest.approx(delta_se, rel=1e-9)
    assert metrics["loss_recovered_se"] == pytest.approx(lr_se, rel=1e-9)
    # spliced - clean per window: 0.5, 0.25, 0.75, 0.3 -> mean 0.45, sample SD 0.2273...
    assert metrics["delta_lm_loss_se"] == pytest.approx(0.2273030282830976 / 2)


def _hand_clustered_se(windows, documents):
    """Cluster-robust errors by hand: per-document sums of the linearised residuals."""
    import numpy as np

    w, documents = np.array(windows), np.array(documents)
    n, groups = len(w), np.unique(documents)
    c, s, z = w.mean(0)
    lr = (z - s) / (z - c)
    linear = {"delta": w[:, 1] - w[:, 0],
              "lr": (lr * w[:, 0] - w[:, 1] + (1 - lr) * w[:, 2]) / (z - c)}
    out = {}
    for name, values in linear.items():
        totals = [(values[documents == g] - values.mean()).sum() for g in groups]
        out[name] = np.sqrt(len(groups) / (len(groups) - 1) * np.sum(np.square(totals))) / n
    return out


def test_standard_errors_cluster_windows_by_document():
    """Two windows per document: the error counts 2 documents, not 4 windows; windows of
    one document that agree give a larger error than the window-level formula."""
    documents = torch.tensor([0, 0, 1, 1])
    metrics = lm_eval.loss_recovered(lm_eval.window_sums(_w(WINDOWS), 10, documents, 2))
    hand = _hand_clustered_se(WINDOWS, [0, 0, 1, 1])
    assert metrics["loss_recovered"] == pytest.approx(0.8)
    assert metrics["delta_lm_loss_se"] == pytest.approx(hand["delta"], rel=1e-9)
    assert metrics["loss_recovered_se"] == pytest.approx(hand["lr"], rel=1e-9)
    # delta per window 0.5, 0.25 | 0.75, 0.3: document residual sums -0.15, +0.15
    assert metrics["delta_lm_loss_se"] == pytest.approx((2 * 2 * 0.15 ** 2) ** 0.5 / 4)
    alike = [[3.0, 3.5, 5.0], [3.0, 3.5, 5.0], [2.0, 2.25, 4.5], [2.0, 2.25, 4.5]]
    clustered = lm_eval.loss_recovered(lm_eval.window_sums(_w(alike), 10, documents, 2))
    windowed = lm_eval.loss_recovered(lm_eval.window_sums(_w(alike), 10))
    assert clustered["loss_recovered_se"] > 1.2 * windowed["loss_recovered_se"]


def test_one_document_has_no_standard_error():
    one = torch.zeros(4, dtype=torch.long)
    metrics = lm_eval.loss_recovered(lm_eval.window_sums(_w(WINDOWS), 10, one, 1))
    assert "loss_recovered_se" not in metrics and "delta_lm_loss_se" not in metrics


def test_window_sums_add_up_across_processes():
    """DDP sums each process's vector: two shares must give the one-process result."""
    documents = torch.tensor([0, 1, 1, 2])
    whole = lm_eval.window_sums(_w(WINDOWS), 10, documents, 3)
    shares = lm_eval.window_sums(_w(WINDOWS[::2]), 10, documents[::2], 3) + \
        lm_eval.window_sums(_w(WINDOWS[1::2]), 10, documents[1::2], 3)
    assert torch.allclose(whole, shares)
    assert lm_eval.loss_recovered(shares) == pytest.approx(lm_eval.loss_recovered(whole))


def test_one_window_has_no_standard_error():
    metrics = lm_eval.loss_recovered(lm_eval.window_sums(_w(WINDOWS[:1]), 10))
    assert "loss_recovered_se" not in metrics and "delta_lm_loss_se" not in metrics
    assert metrics["loss_recovered"] == pytest.approx(0.75)


def test_ce_sums_window_statistics_agree_with_the_token_means(lm):
    tokens = lm.heldout_tokens(4)
    sums = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    assert sums.shape == (lm_eval.n_sums(4),)
    by_window = sums[4:].view(4, 4)
    assert by_window[:, 0].tolist() == [1, 1, 1, 1]  # one window per document by default
    # equal-length windows: the mean of window means is the token mean
    assert torch.allclose(by_window[:, 1:].mean(0), sums[:3] / sums[3])
    metrics = lm_eval.loss_recovered(sums)
    assert metrics["loss_recovered_se"] > 0 and metrics["delta_lm_loss_se"] > 0


def test_reference_ce_is_computed_once_per_window_set(lm, tmp_path, monkeypatch):
    """With a reference folder (an activation cache's), CE clean and zero-ablated are kept
    on disk: a second evaluation runs the LM once per chunk (spliced) instead of three
    times, and gives the same bits; other windows get their own entry."""
    calls = []
    run = lm.bridge.run_with_hooks

    def counted(*args, **kwargs):
        calls.append(len(kwargs.get("fwd_hooks", [])))
        return run(*args, **kwargs)

    monkeypatch.setattr(lm.bridge, "run_with_hooks", counted)
    tokens = lm.heldout_tokens(12)[:4]  # one chunk of lm_batch_size 8
    plain = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    assert len(calls) == 3
    monkeypatch.setattr(lm, "reference_dir", tmp_path / "reference_ce", raising=False)
    first = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    calls.clear()
    second = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    assert calls == [1]  # the spliced pass only
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert len(list((tmp_path / "reference_ce").glob("*.pt"))) == 1
    lm_eval.ce_sums(lm, lm.heldout_tokens(12)[4:8], lambda x: x)
    assert len(list((tmp_path / "reference_ce").glob("*.pt"))) == 2
