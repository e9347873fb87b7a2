"""Ground truth: a gated SAE trained by `fit` on synthetic data finds the true features.

Thresholds, not pinned floats. The configuration is base.yaml's,
shrunk so the test takes well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsae_pl.fit import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gated_sae_recovers_most_true_features(tmp_path):
    rc = main(["--config", str(ROOT / "ablations/gated.yaml"), f"output.dir={tmp_path}",
               "output.name=recovery", "data.source=synthetic",
               "trainer.enable_progress_bar=false",
               "trainer.accelerator=cpu", "data.batch_size=512", "trainer.max_steps=3000",
               "eval.every_n_steps=3000", "eval.rows=8192", "checkpoint.every_n_steps=3000"])
    assert rc == 0
    metrics = json.loads((tmp_path / "recovery" / "metrics.json").read_text())
    assert metrics["mmcs"] > 0.9
    assert metrics["fraction_recovered"] > 0.75
    assert metrics["fvu"] < 0.3
    assert 0.95 < metrics["relative_reconstruction_bias"] < 1.05  # gated: no shrinkage
