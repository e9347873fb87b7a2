"""Every shipped ablation trains: a tiny synthetic fit of each delta YAML ends with finite
metrics (the suite's runs use the same files at real scale)."""

from __future__ import annotations

import math

import pytest

from gsae_pl.fit import main
from tests.tiny_run import ROOT, TINY, metrics

ABLATIONS = sorted(ROOT.glob("ablations/*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_trains(path, tmp_path):
    extra = ["trainer.max_steps=20", "eval.every_n_steps=20", "checkpoint.every_n_steps=20"]
    assert main(["--config", str(path), f"output.dir={tmp_path}", "output.name=run", *TINY,
                 *extra]) == 0
    found = metrics(tmp_path, "run")
    assert found["steps"] == 20 and all(math.isfinite(v) for v in found.values()), found
