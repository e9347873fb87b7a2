"""Held-out evaluations are plug-ins (gsae_pl/eval/): one defined here, in no gsae_pl file,
gets its `eval.<name>` block, runs in `fit`, lands in metrics.json and the suite report;
switches and sources decide which evaluations run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import yaml
from torchmetrics import MeanMetric

from gsae_pl.config import load_config
from gsae_pl.data.synthetic import SyntheticSource
from gsae_pl.eval.base import EVALUATORS, Evaluator, Settings, build_evaluators
from gsae_pl.run.train import fit
from gsae_pl.suite.report import write_report
from tests.conftest import make_cfg
from tests.tiny_run import BASE, TINY


@dataclass
class NormSettings(Settings):
    scale: float = 1.0


class MeanInputNorm(Evaluator):
    """A toy evaluation: `scale` x the mean norm of the held-out rows the SAE sees."""

    Settings = NormSettings

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.mean = MeanMetric()

    def update(self, x, x_hat, enc) -> None:
        self.mean.update(x.double().norm(dim=1))

    def compute(self, ctx) -> dict:
        return {"mean_input_norm": self.settings.scale * self.mean.compute()}


class FirstTimeOnly(Evaluator):
    """Yields its metric at the first evaluation of a process only."""

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.calls = 0

    def compute(self, ctx) -> dict:
        self.calls += 1
        return {"first_time_only": 1.0} if self.calls == 1 else {}


@pytest.fixture
def toy():
    """Registered for this test only (the registry is shared by the whole process)."""
    EVALUATORS.names()  # the shipped ones first, as any lookup would load them
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(EVALUATORS._entries, "mean_input_norm", MeanInputNorm)
        yield


def test_a_new_evaluation_reaches_fit_metrics_json_and_the_report(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(EVALUATORS._entries, "first_time_only", FirstTimeOnly)
    suite = tmp_path / "suite"
    cfg = load_config(BASE, [*TINY, f"output.dir={suite / 'runs'}", "output.name=toy",
                             "eval.mean_input_norm.scale=2.0"])
    metrics = fit(cfg)
    # Held-out rows as the SAE saw them (x * norm_scale), by hand.
    rows = SyntheticSource(cfg.data.synthetic).eval_rows(cfg.eval.rows).double()
    expected = 2.0 * (rows * metrics["norm_scale"]).norm(dim=1).mean().item()
    assert metrics["mean_input_norm"] == pytest.approx(expected, rel=1e-6)
    written = json.loads((suite / "runs" / "toy" / "metrics.json").read_text())
    assert written["mean_input_norm"] == metrics["mean_input_norm"]
    # The shipped evaluations still run; loss recovered does not apply to synthetic data.
    assert {"fvu", "l0", "mmcs", "fraction_recovered"} <= set(written)
    assert "loss_recovered" not in written and math.isfinite(written["fvu"])
    # Evaluated at steps 20 and 40: only the last evaluation's metrics are the run's.
    assert "first_time_only" not in written

    (suite / "suite.yaml").write_text(yaml.safe_dump({"variants": {"gated": {}},
                                                      "metrics": ["mean_input_norm"]}))
    text = write_report(suite).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert "| mean_input_norm |" in header
    assert (suite / "plots" / "l0_vs_mean_input_norm.png").is_file()


def test_switched_off_or_inapplicable_evaluations_are_not_built(toy):
    source = SimpleNamespace(true_features=torch.eye(4), lm=None)
    built = build_evaluators(make_cfg("sae.d_sae=8"), 4, source)
    # soft_gate is built wherever there are held-out rows; it yields for a sigmoid gate only.
    # Off by default: probes; no LM: loss_recovered. Built in the registry's order.
    assert {"ground_truth", "reconstruction", "soft_gate", "mean_input_norm"} <= set(built)
    assert not {"loss_recovered", "probes"} & set(built)
    assert list(built) == [name for name in EVALUATORS.names() if name in built]
    off = make_cfg("sae.d_sae=8", "eval.mean_input_norm.enabled=false",
                   "eval.reconstruction.enabled=false", "eval.soft_gate.enabled=false")
    built_off = set(build_evaluators(off, 4, source))
    assert "ground_truth" in built_off
    assert not {"mean_input_norm", "reconstruction", "soft_gate"} & built_off
    # No source (a module built for export): only what needs none.
    assert "ground_truth" not in build_evaluators(make_cfg("sae.d_sae=8"), 4, None)


@pytest.mark.parametrize("override,runs", [
    ("eval.lm_contexts=0", False),  # the old key's 0 still means off
    ("eval.lm_contexts=8", True),
    ("eval.loss_recovered.contexts=0", False),
    ("eval.loss_recovered.enabled=false", False),
])
def test_loss_recovered_runs_only_when_on_and_the_source_has_an_lm(override, runs):
    cfg = load_config(BASE, ["data.source=synthetic", override])
    with_lm = SimpleNamespace(true_features=None, lm=object())
    assert ("loss_recovered" in build_evaluators(cfg, 4, with_lm)) == runs
    without = SimpleNamespace(true_features=None, lm=None)
    assert "loss_recovered" not in build_evaluators(cfg, 4, without)
