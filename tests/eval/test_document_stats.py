"""Per-document statistics (gsae_pl/eval/document_stats.py): the clustered standard errors
against hand-computed cases, the jackknife of the dead fraction, the features fired in one
document alone, and heldout_documents.npz read back to the run's own metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gsae_pl.eval import document_stats
from gsae_pl.eval.document_stats import clustered_se, read_document_stats, reconstruction_ses
from gsae_pl.eval.metrics import FiringDocuments, GroupSums, active_entries
from gsae_pl.fit import main
from tests.tiny_run import args


def test_l0_se_by_hand():
    # documents of 2, 2, 1 rows with L0 sums 4, 2, 3: mean 9/5, residuals 0.4, -1.6, 1.2
    se = clustered_se(np.array([[4.0], [2.0], [3.0]]), np.array([2.0, 2.0, 1.0]), [1.0])
    assert se == pytest.approx(math.sqrt(3 / 2 * (0.16 + 2.56 + 1.44) / 25))


def test_one_row_per_document_is_the_plain_standard_error_of_the_mean():
    values = np.array([1.0, 4.0, 2.0, 7.0, 3.0])
    se = clustered_se(values[:, None], np.ones(5), [1.0])
    assert se == pytest.approx(values.std(ddof=1) / math.sqrt(5))


def test_gamma_se_by_hand():
    # gamma = sum ||x_hat||^2 / sum x_hat.x; two documents of one row each
    table = {"rows": np.array([1.0, 1.0]), "l0_sum": np.array([1.0, 1.0]),
             "sq_err": np.array([0.0, 0.0]), "x_sq": np.array([1.0, 1.0]),
             "x_hat_sq": np.array([1.0, 4.0]), "x_hat_dot_x": np.array([1.0, 2.0]),
             "x_sum": np.array([[1.0, 0.0], [-1.0, 0.0]]), "only_here": np.zeros(2),
             "d_sae": 4}
    ses = reconstruction_ses(table)
    # m_h = 2.5, m_d = 1.5, gamma = 5/3; scores (h_g - m_h) / m_d - gamma (d_g - m_d) / m_d
    gamma = 2.5 / 1.5
    scores = [(h - 2.5) / 1.5 - gamma * (d - 1.5) / 1.5 for h, d in ((1, 1), (4, 2))]
    assert ses["gamma_se"] == pytest.approx(math.sqrt(2 * sum(s * s for s in scores) / 4))
    assert ses["l0_se"] == 0.0 and ses["dead_fraction_se"] == 0.0


def test_fvu_se_is_the_delta_method_of_its_formula():
    """Against a numerical gradient of FVU as a function of the document totals' means."""
    gen = np.random.default_rng(0)
    n_docs, d = 6, 3
    rows = gen.integers(1, 5, n_docs).astype(float)
    table = {"rows": rows, "l0_sum": rows * 2, "sq_err": gen.random(n_docs) * rows,
             "x_sq": 3 + gen.random(n_docs) * rows, "x_hat_sq": rows, "x_hat_dot_x": rows,
             "x_sum": gen.normal(size=(n_docs, d)), "only_here": np.zeros(n_docs), "d_sae": 4}
    totals = np.hstack([table["sq_err"][:, None], table["x_sq"][:, None], table["x_sum"]])
    n = rows.sum()

    def fvu(m):
        return m[0] / (m[1] - m[2:] @ m[2:])

    mean = totals.sum(0) / n
    grad = np.array([(fvu(mean + e * 1e-7) - fvu(mean - e * 1e-7)) / 2e-7
                     for e in np.eye(len(mean))])
    scores = (totals - rows[:, None] * mean) @ grad
    want = math.sqrt(n_docs / (n_docs - 1) * scores @ scores / n ** 2)
    assert reconstruction_ses(table)["fvu_se"] == pytest.approx(want, rel=1e-5)


def test_dead_fraction_jackknife_by_hand():
    # without document g, u_g more features are dead: u = 2, 0, 1 of 10 features
    se = document_stats.dead_fraction_se(np.array([2.0, 0.0, 1.0]), np.ones(3), 10)
    assert se == pytest.approx(math.sqrt(2 / 3 * 2) / 10)


def test_features_fired_in_one_document_alone_are_counted_there():
    firing = FiringDocuments(n_documents=3, d_sae=4)
    # rows 0,1 in document 0, row 2 in document 2; feature 0 fires in both documents,
    # feature 1 only in document 0 (twice), feature 3 only in document 2, feature 2 never
    f = torch.tensor([[1.0, 1.0, 0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 1.0]])
    rows, features = active_entries(f)
    firing.update(rows, features, torch.tensor([0, 0, 2]))
    assert firing.compute().tolist() == [1.0, 0.0, 1.0]


def test_group_sums_by_hand():
    sums = GroupSums(2, 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    totals, x_sum = sums(x, x_hat, active_entries(f)[0], torch.tensor([0, 1, 1]))
    assert totals.tolist() == [[1, 0, 1, 1, 1, 1], [2, 3, 6, 1, 2, 2]]
    assert x_sum.tolist() == [[1, 0], [1, 3]]


def test_the_runs_file_reads_back_to_its_metrics_and_their_errors(tmp_path):
    assert main(args(tmp_path, "run")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    table = read_document_stats(tmp_path / "run")
    # synthetic data: 512 held-out rows in blocks of 256 rows
    assert table["document"].tolist() == [0, 1] and table["rows"].tolist() == [256, 256]
    n = table["rows"].sum()
    assert table["l0_sum"].sum() / n == pytest.approx(metrics["l0"])
    mean = table["x_sum"].sum(0) / n
    assert table["sq_err"].sum() / (table["x_sq"].sum() - n * mean @ mean) == \
        pytest.approx(metrics["fvu"])
    assert table["x_hat_sq"].sum() / table["x_hat_dot_x"].sum() == \
        pytest.approx(metrics["relative_reconstruction_bias"])
    assert int(table["dead_features"]) == round(metrics["dead_fraction"] * int(table["d_sae"]))
    for key, value in reconstruction_ses(table).items():
        assert metrics[key] == pytest.approx(value)
    assert {"l0_se", "fvu_se", "gamma_se", "norm_ratio_se", "dead_fraction_se"} <= set(metrics)
    assert "ce_windows" not in table  # no language model behind synthetic rows
    from gsae_pl.suite.report import read_run

    row = read_run(tmp_path / "run")  # a suite's results.csv row: every metric, SEs too
    assert {"l0_se", "fvu_se", "gamma_se", "outlier_row_fraction"} <= set(row)


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / document_stats.FILE).write_bytes(document_stats.to_bytes({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        read_document_stats(tmp_path)
