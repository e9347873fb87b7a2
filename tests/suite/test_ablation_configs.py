"""Every shipped ablation trains: a tiny synthetic fit of each delta YAML ends with finite
metrics (the suite's runs use the same files at real scale)."""

from __future__ import annotations

import math

import pytest

from gsae_pl.fit import main
from gsae_pl.suite.spec import is_suite_file, load_suite
from tests.tiny_run import ROOT, TINY, metrics

ABLATIONS = [p for p in sorted(ROOT.glob("ablations/*.yaml")) if not is_suite_file(p)]
SUITES = [p for p in sorted(ROOT.glob("ablations/*.yaml")) if is_suite_file(p)]


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_shipped_suite_expands_into_valid_runs(path):
    suite = load_suite(path)  # loads and validates every run's config
    assert len(suite.runs) >= 3 and len({run.name for run in suite.runs}) == len(suite.runs)


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_trains(path, tmp_path):
    extra = ["trainer.max_steps=20", "eval.every_n_steps=20", "checkpoint.every_n_steps=20",
             "sae.rescale_shift_steps=10"]  # read by rescale_shift only
    assert main(["--config", str(path), f"output.dir={tmp_path}", "output.name=run", *TINY,
                 *extra]) == 0
    found = metrics(tmp_path, "run")
    assert found["steps"] == 20 and all(math.isfinite(v) for v in found.values()), found
