"""The suite report's learning curves (gsae_pl/suite/milestones.py): milestones.csv beside an
unchanged results.csv, the metrics-vs-tokens figure, and nothing of either without
milestones."""

from __future__ import annotations

import csv
import json

from gsae_pl.suite.milestones import curves, milestone_rows
from gsae_pl.suite.report import load_rows, write_report
from tests.suite.test_report import PNG_MAGIC, _lm_metrics, _run

# run -> [(tokens, l0, loss recovered)] at its milestones; the final evaluation at 25600.
MILESTONES = {("gated", 0.01, 0): [(6400, 60.0, 0.90), (12800, 50.0, 0.93)],
              ("gated", 0.01, 1): [(6400, 62.0, 0.88), (12800, 48.0, 0.95)],
              ("baseline", 0.01, 0): [(6400, 120.0, 0.80), (25600, 80.0, 0.95)]}


def _suite(tmp_path, with_milestones: bool):
    suite = tmp_path / "suite"
    for (variant, l1, seed), points in MILESTONES.items():
        name = _run(suite, variant, l1, seed, _lm_metrics(points[-1][1] - 10, 0.96))
        if with_milestones:
            found = [{"step": t // 256, "tokens": t, "tokens_asked": t, "l0": l0,
                      "loss_recovered": lr, "fvu": 0.2} for t, l0, lr in points]
            (suite / "runs" / name / "milestones.json").write_text(
                json.dumps({"milestones": found}))
    return suite


def test_milestones_csv_the_figure_and_an_unchanged_results_csv(tmp_path):
    plain = _suite(tmp_path / "plain", with_milestones=False)
    report = write_report(plain).read_text()
    assert not (plain / "milestones.csv").exists()
    assert not (plain / "plots" / "metrics_vs_tokens.png").exists()
    assert "Learning curves" not in report

    suite = _suite(tmp_path / "curves", with_milestones=True)
    report = write_report(suite).read_text()
    assert (suite / "results.csv").read_text() == (plain / "results.csv").read_text()
    with open(suite / "milestones.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:8] == ["variant", "swept", "value", "seed", "step", "tokens",
                                 "tokens_asked", "fvu"] and list(rows[0])[-1] == "run"
    assert [(r["variant"], r["seed"], r["tokens"], r["l0"]) for r in rows] == [
        ("baseline", "0", "6400", "120.0"), ("baseline", "0", "25600", "80.0"),
        ("gated", "0", "6400", "60.0"), ("gated", "0", "12800", "50.0"),
        ("gated", "1", "6400", "62.0"), ("gated", "1", "12800", "48.0")]
    png = suite / "plots" / "metrics_vs_tokens.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "## Learning curves" in report and "(plots/metrics_vs_tokens.png)" in report


def test_a_curve_is_the_seed_mean_at_each_milestone_then_the_final_evaluation(tmp_path):
    suite = _suite(tmp_path, with_milestones=True)
    rows, _ = load_rows(suite)
    found = curves(milestone_rows(suite, rows), rows, "l0")
    # gated: seeds averaged at each milestone, then the runs' final L0 (40 and 38) at
    # 25600 tokens; baseline's last milestone is its final step, not drawn twice.
    assert found == {("baseline", 0.01): [(6400, 120.0), (25600, 80.0)],
                     ("gated", 0.01): [(6400, 61.0), (12800, 49.0), (25600, 39.0)]}
