"""SynthSAEBench's metrics: hand-computed cases, an SAE that is the truth, and a fit on the
synthsaebench source that reports them."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from gsae_pl.eval.base import EvalContext
from gsae_pl.eval.synthsaebench import (
    SynthSAEBench,
    SynthSAEBenchSettings,
    classification,
    cosines,
    mcc,
    uniqueness,
)
from gsae_pl.fit import main
from gsae_pl.saes.base import Encoding
from tests.tiny_run import BASE, metrics

TRUE = torch.nn.functional.normalize(torch.randn(6, 5, generator=torch.Generator()
                                                 .manual_seed(0)), dim=1)


def test_mcc_is_one_for_the_true_features_in_any_order_and_sign():
    assert mcc(cosines(TRUE, TRUE)) == pytest.approx(1.0)
    permuted = -3.0 * TRUE[torch.tensor([4, 2, 0, 5, 1, 3])]  # scale and sign do not count
    assert mcc(cosines(permuted, TRUE)) == pytest.approx(1.0)
    assert mcc(cosines(TRUE[:3], TRUE)) == pytest.approx(1.0)  # fewer latents than features


def test_mcc_takes_the_best_one_to_one_matching():
    # latent 0 is closest to both features, latent 1 only fits feature 0: the matching
    # pairs latent 0 with feature 1 (0.8 + 0.6 = 1.4 beats 0.9 + 0.1 = 1.0).
    cos = torch.tensor([[0.9, 0.8], [0.6, 0.1]])
    assert mcc(cos) == pytest.approx(0.7)


def test_uniqueness_counts_distinct_best_matches_per_latent():
    latents = torch.stack([TRUE[0], TRUE[0] * 2, TRUE[1], TRUE[2]])
    assert uniqueness(cosines(latents, TRUE)) == pytest.approx(3 / 4)


def test_precision_recall_f1_by_hand():
    # latent 0: tp 3, fp 1, fn 1, tn 5 -> P 3/4, R 3/4, F1 3/4, acc 8/10
    # latent 1: never fires, its feature fires twice -> P 0, R 0, F1 0, acc 8/10
    got = classification(torch.tensor([3.0, 0]), torch.tensor([1.0, 0]),
                         torch.tensor([1.0, 2]), torch.tensor([5.0, 8]))
    assert got == pytest.approx({"synth_precision": 3 / 8, "synth_recall": 3 / 8,
                                 "synth_f1": 3 / 8, "synth_accuracy": 0.8})


class TruthSource:
    """Three unit features = the axes of R^3; rows are their activations, given."""

    def __init__(self, c: torch.Tensor):
        self.c, self.true_features = c, torch.eye(3)

    def eval_rows(self, n):
        return self.c[:n].clone()

    def eval_features(self, n):
        return self.c[:n].to_sparse().coalesce()


class IdentitySAE(nn.Module):
    """Latents = ReLU(x) on the axes, plus a fourth latent that never fires."""

    W_dec = torch.cat([torch.eye(3), torch.tensor([[1.0, 1.0, 0.0]])])

    def forward(self, x):
        f = torch.cat([x.relu(), torch.zeros(len(x), 1)], 1)
        return f @ self.W_dec, Encoding(f=f, gate_acts=f, fired=(f != 0).sum(0))


def context(sae) -> EvalContext:
    return EvalContext(sae=sae, norm_scale=torch.tensor(2.0), device=torch.device("cpu"),
                       rank=0, world_size=1, reduce_sum=lambda t: t,
                       log_histogram=lambda prefix, density: {})


def test_an_sae_that_is_the_truth_scores_perfectly():
    c = torch.tensor([[1.0, 0, 2], [0, 3, 0], [0, 0, 0], [4, 5, 0], [0, 0, 1]])
    cfg = OmegaConf.create({"eval": {"rows": 5}, "data": {"batch_size": 2}})
    settings = OmegaConf.structured(SynthSAEBenchSettings)
    assert SynthSAEBench.applies(settings, TruthSource(c))
    assert not SynthSAEBench.applies(settings, None)
    got = SynthSAEBench(settings, cfg, 3, TruthSource(c)).compute(context(IdentitySAE()))
    # latent 3 never fires: precision and recall 0 for it, so the means are 3/4
    assert got == pytest.approx({
        "synth_precision": 0.75, "synth_recall": 0.75, "synth_f1": 0.75,
        "synth_accuracy": (3 + 3 / 5) / 4,  # latent 3 is matched to feature 0 (2 rows fire)
        "synth_explained_variance": 1.0, "synth_l0": 6 / 5, "synth_true_l0": 6 / 5,
        "synth_dead_latents": 1, "synth_shrinkage": 1.0,
        "synth_mcc": 1.0,  # 3 features, 3 matched pairs, all exact; latent 3 is left over
        "synth_uniqueness": 3 / 4})


@pytest.mark.slow
def test_a_fit_on_the_synthsaebench_source_reports_the_metrics(tmp_path):
    assert main(["--config", BASE, f"output.dir={tmp_path}", "output.name=run",
                 "data.source=synthsaebench", "trainer.max_steps=30", "data.batch_size=128",
                 "eval.rows=512", "eval.every_n_steps=30", "data.normalize_rows=256",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                 "sae.d_sae=64", "data.synthsaebench.n_features=96",
                 "data.synthsaebench.d_in=16", "data.synthsaebench.hierarchy_roots=4",
                 "data.synthsaebench.orthogonalize_steps=2",
                 "resample.enabled=false"]) == 0
    found = metrics(tmp_path, "run")
    assert 0 < found["synth_mcc"] <= 1 and 0 < found["synth_uniqueness"] <= 1
    assert found["synth_l0"] == pytest.approx(found["l0"])
    assert found["synth_explained_variance"] == pytest.approx(1 - found["fvu"], abs=1e-6)
    assert found["synth_true_l0"] > 0 and "synth_f1" in found and "mmcs" in found
