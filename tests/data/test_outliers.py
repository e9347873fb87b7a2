"""Rows of extreme norm (data.outlier_norm_ratio, gsae_pl/data/outliers.py): a file with
planted outliers, masked by hand; the spliced loss keeps the clean activation at them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gsae_pl.data.base import train_stream
from gsae_pl.data.file import FileSource
from gsae_pl.data.outliers import median_norm, outlier_rows
from gsae_pl.eval.base import EvalContext
from gsae_pl.eval.document_stats import read_document_stats
from gsae_pl.fit import main
from tests.tiny_run import BASE

N, D, HELD_OUT, BATCH, SAMPLE = 1280, 8, 256, 64, 256


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Gaussian rows with every 20th row scaled by 100: far above 10x the median norm."""
    rows = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    rows[::20] *= 100
    path = tmp_path_factory.mktemp("outliers") / "acts.npy"
    np.save(path, rows)
    return path, rows


def _fit(tmp_path, path, name, *extra):
    assert main(["--config", BASE, f"output.dir={tmp_path}", f"output.name={name}",
                 "data.source=file", f"data.path={path}", f"eval.rows={HELD_OUT}",
                 f"data.batch_size={BATCH}", f"data.normalize_rows={SAMPLE}",
                 "trainer.max_steps=10", "eval.every_n_steps=10", "log.every_n_steps=5",
                 "log.histogram_every_n_steps=5", "checkpoint.every_n_steps=10",
                 "trainer.accelerator=cpu", "sae.d_sae=16", *extra]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


def _by_hand(path, rows):
    """The normalisation sample (the first training rows), its median norm, and which
    held-out rows are planted outliers."""
    sample = torch.cat([b for _, b in zip(range(SAMPLE // BATCH),
                                          train_stream(FileSource(path, 0, HELD_OUT, BATCH),
                                                       BATCH))])
    heldout = torch.from_numpy(rows[N - HELD_OUT:])
    planted = torch.zeros(N, dtype=torch.bool)
    planted[::20] = True
    return sample, heldout, planted[N - HELD_OUT:]


def test_the_mask_finds_the_planted_rows(planted):
    path, rows = planted
    sample, heldout, planted_rows = _by_hand(path, rows)
    median = float(sample.double().norm(dim=1).median())
    assert median_norm(sample) == median
    assert torch.equal(outlier_rows(heldout, 10 * median), planted_rows)


def test_outliers_are_left_out_of_normalisation_and_metrics(planted, tmp_path):
    path, rows = planted
    sample, heldout, planted_rows = _by_hand(path, rows)
    metrics = _fit(tmp_path, path, "on", "data.outlier_norm_ratio=10")
    median = float(sample.double().norm(dim=1).median())
    assert metrics["median_norm"] == pytest.approx(median)
    kept = sample[~outlier_rows(sample, 10 * median)]
    assert len(kept) < len(sample)
    assert metrics["norm_scale"] == pytest.approx(
        math.sqrt(D / float(kept.double().pow(2).sum(1).mean())), rel=1e-6)
    sq = heldout.double().pow(2).sum(1)
    assert metrics["outlier_row_fraction"] == pytest.approx(float(planted_rows.double().mean()))
    assert metrics["outlier_norm_fraction"] == pytest.approx(float(sq[planted_rows].sum() /
                                                                   sq.sum()))
    assert read_document_stats(tmp_path / "on")["rows"].sum() == (~planted_rows).sum()
    assert "fvu_outlier" not in metrics  # they were left out: nothing to split


def test_with_the_option_off_typical_and_outlier_rows_are_reported_apart(planted, tmp_path):
    path, rows = planted
    _, heldout, planted_rows = _by_hand(path, rows)
    metrics = _fit(tmp_path, path, "off")
    assert metrics["outlier_row_fraction"] == pytest.approx(float(planted_rows.double().mean()))
    assert {"fvu_typical", "fvu_outlier", "gamma_typical", "gamma_outlier"} <= set(metrics)
    assert read_document_stats(tmp_path / "off")["rows"].sum() == HELD_OUT  # all measured


def test_a_ratio_at_or_below_one_is_refused(planted, tmp_path, capsys):
    rc = main(["--config", BASE, f"output.dir={tmp_path / 'out'}", "data.source=file",
               f"data.path={planted[0]}", f"eval.rows={HELD_OUT}", "data.outlier_norm_ratio=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.outlier_norm_ratio=1.0" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_loss_recovered_splices_the_sae_only_at_kept_rows():
    class Zeros(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x), None

    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])  # norms 5, 0.5, 50
    ctx = EvalContext(sae=Zeros(), norm_scale=torch.tensor(2.0), device=torch.device("cpu"),
                      rank=0, world_size=1, reduce_sum=lambda t: t, log_histogram=None,
                      outlier_norm=10.0)
    out = ctx.reconstruct_raw(x)
    assert torch.equal(out[2], x[2]) and not out[:2].any()
