"""`fit` on language-model activations: loss recovered in metrics.json, the cache path,
bad input refused before anything is written, and a 2-process CPU DDP run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gsae_pl.fit import main
from tests.data.lm_fixtures import write_text, write_tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
LM_KEYS = {"ce_clean", "ce_spliced", "ce_zero", "loss_recovered", "delta_lm_loss"}


@pytest.fixture(scope="module")
def lm_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit_lm")
    model, corpus = write_tiny_gpt2(root / "model"), write_text(root / "corpus", n_docs=300)
    return ["--config", str(ROOT / "configs/base.yaml"), "data.source=transformer_lens",
            f"data.model={model}", f"data.dataset={corpus}", "data.context_size=16",
            "data.buffer_size=256", "data.batch_size=32", "data.lm_batch_size=8",
            "data.normalize_rows=64", "eval.rows=64", "eval.loss_recovered.contexts=4",
            "eval.every_n_steps=10", "trainer.max_steps=20", "log.every_n_steps=5",
            "log.histogram_every_n_steps=10", "checkpoint.every_n_steps=10", "sae.d_sae=64",
            "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["stream", "cache"])
def test_fit_reports_loss_recovered(lm_args, tmp_path, cached):
    extra = ["data.cache=true", f"data.cache_dir={tmp_path / 'acts'}"] if cached else []
    assert main([*lm_args, f"output.dir={tmp_path}", "output.name=run", *extra]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert LM_KEYS <= set(metrics) and all(math.isfinite(metrics[k]) for k in LM_KEYS)
    assert metrics["ce_zero"] != metrics["ce_clean"] and metrics["norm_scale"] > 0
    if cached:
        meta = json.loads((tmp_path / "acts" / "metadata.json").read_text())
        assert meta["rows"] == 20 * 32 and meta["key"]["hook"] == "blocks.0.mlp.hook_post"
        # CE clean / zero-ablated kept for the next run on this cache (lm_eval.py)
        assert list((tmp_path / "acts" / "reference_ce").glob("*.pt"))


@pytest.mark.parametrize("extra,needle", [
    (["data.hook=blocks.0.mlp.hook_pst"], "close valid ones: blocks.0.mlp.hook_post"),
    (["data.model=no/such/model/x"], "use data.source=tiny_lm"),
    (["data.source=transformer_lens", "data.model=null"], "needs data.model"),
])
def test_bad_lm_input_is_one_line_exit_2_nothing_written(lm_args, tmp_path, capsys, extra,
                                                         needle):
    rc = main([*lm_args, f"output.dir={tmp_path / 'out'}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_process_cpu_ddp_fit(lm_args, tmp_path):
    cmd = [sys.executable, "-m", "gsae_pl.fit", *lm_args, f"output.dir={tmp_path}",
           "output.name=ddp", "trainer.devices=2", "trainer.strategy=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["tokens"] == 20 * 32 and LM_KEYS <= set(metrics)
    assert math.isfinite(metrics["loss_recovered"])


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0, 2])
def test_lm_runs_keep_document_stats_and_report_outlier_rows(lm_args, tmp_path, ratio):
    """heldout_documents.npz holds loss recovered's per-document CE sums beside the rows'
    (gsae_pl/eval/document_stats.py); outlier rows are reported, and split off when the
    option is off (data/outliers.py)."""
    from gsae_pl.eval.document_stats import read_document_stats

    assert main([*lm_args, f"output.dir={tmp_path}", "output.name=run",
                 f"data.outlier_norm_ratio={ratio}"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    table = read_document_stats(tmp_path / "run")
    assert table["ce_windows"].sum() == 4 and table["ce_tokens"].sum() == 4 * 15
    assert table["ce_clean_sum"].sum() / 60 == pytest.approx(metrics["ce_clean"])
    assert table["ce_spliced_sum"].sum() / 60 == pytest.approx(metrics["ce_spliced"])
    assert len(table["document"]) > 1 and metrics["median_norm"] > 0
    assert 0 <= metrics["outlier_row_fraction"] <= metrics["outlier_norm_fraction"] <= 1
    kept = round(64 * (1 - metrics["outlier_row_fraction"]))
    assert table["rows"].sum() == (kept if ratio else 64)
    assert ("fvu_typical" in metrics) == (ratio == 0)
    assert all(math.isfinite(metrics[k]) for k in ("l0_se", "fvu_se", "loss_recovered"))
