"""Loss recovered (PAPER.md sec. 6): 1 for a perfect reconstruction, 0 for zeros."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gsae_pl import lm_eval
from gsae_pl.data.transformer_lens import build_lm_source
from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_lm")
    return build_lm_source(lm_cfg(write_tiny_gpt2(root / "model"), write_text(root / "corpus")))


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
    from gsae_pl.module import SAEModule
    from tests.conftest import make_cfg

    module = SAEModule(dict(make_cfg("eval.lm_contexts=3")), lm.d_in)
    module.norm_scale.fill_(3.7)
    module.sae.forward = lambda x: (x, None)
    module._trainer = SimpleNamespace(  # just what `_loss_recovered` reads
        datamodule=SimpleNamespace(source=lm), global_rank=0, world_size=1,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    metrics = module._loss_recovered()
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert set(metrics) == {"ce_clean", "ce_spliced", "ce_zero", "loss_recovered",
                            "delta_lm_loss"}
