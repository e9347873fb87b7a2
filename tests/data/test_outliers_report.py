"""benchmarks/smollm2_outliers.py: the flagging, shares, positions and layer onset against
hand-computed values on hand-made norms, and its per-layer norms against the source's own
activations on the tiny random GPT-2 (tests/data/lm_fixtures.py). No SmolLM2, no downloads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2
from tests.tiny_run import ROOT


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location(
        "smollm2_outliers", ROOT / "benchmarks/smollm2_outliers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two windows of 5 tokens, BOS id 0: window 1 has a document separator (also 0) at
# position 3. Non-BOS rows, in row-major order: (0,1) (0,2) (0,3) (0,4) (1,1) (1,2) (1,4).
TOKENS = torch.tensor([[0, 5, 6, 7, 5],
                       [0, 7, 6, 0, 5]])


def _norms() -> torch.Tensor:
    """[3 layers, 2, 5]: every row 1 except
    - (0,1), token 5: 1, 50, 100 -> above 10x the median (1) from layer 1: onset 1
    - (1,4), token 5, first after the separator: 20, 30, 40 -> onset 0
    - (0,3), token 7: 20, 1, 1 -> an outlier at layer 0 only, not at the site (layer 2)
    - BOS rows (0,0): 1, 200, 300; (1,0): 5, 500, 600; separator (1,3): 1, 1, 50."""
    norms = torch.ones(3, 2, 5, dtype=torch.float64)
    for (b, t), values in {(0, 1): (1, 50, 100), (1, 4): (20, 30, 40), (0, 3): (20, 1, 1),
                           (0, 0): (1, 200, 300), (1, 0): (5, 500, 600),
                           (1, 3): (1, 1, 50)}.items():
        norms[:, b, t] = torch.tensor(values, dtype=torch.float64)
    return norms


def test_flags_shares_positions_and_onset_by_hand(report):
    keep = TOKENS != 0  # the source's keep_mask: position 0 and separators are BOS
    out = report.analyse(_norms(), TOKENS, keep, site=2, decode=lambda t: f"t{t}")
    # Each layer's median of the 7 non-BOS norms is 1, so the limit is 10: at the site,
    # rows (0,1) and (1,4) exceed it.
    assert [r["median_norm"] for r in out["per_layer"]] == [1.0, 1.0, 1.0]
    assert out["site"] == {"rows": 7, "outliers": 2, "share_of_rows": 2 / 7,
                           "share_of_squared_norm": pytest.approx(11600 / 11605)}
    # token 5 occurs 3 times, twice as the first token after a BOS: both outliers
    assert out["tokens"] == [{"token": "t5", "id": 5, "count": 2, "share_of_outliers": 1.0,
                              "occurrences": 3, "outlier_rate": 2 / 3, "first_after_bos": 2,
                              "outlier_rate_first_after_bos": 1.0}]
    assert out["first_after_bos"] == {"rows": 3, "outliers": 2}  # (0,1) (1,1) (1,4)
    assert out["onset_histogram"] == {0: 1, 1: 1}
    # positions 1 and 4 of their windows; both are the first token after a BOS
    assert {b: h["outliers"] for b, h in out["position_in_window"].items()} == \
        {"1": 1, "2": 0, "3": 0, "4": 1}
    since = out["tokens_since_bos"]
    assert since["1"] == {"outliers": 2, "share_of_outliers": 1.0, "share_of_rows": 3 / 7}
    layers = out["per_layer"]
    assert [r["share_of_rows"] for r in layers] == [2 / 7, 2 / 7, 2 / 7]
    assert [r["site_outliers_flagged"] for r in layers] == [0.5, 1.0, 1.0]
    # layer 0's outliers are (0,3), position 3, and (1,4), first after the separator
    assert [r["outliers_first_after_bos"] for r in layers] == [0.5, 1.0, 1.0]
    # the lower median of the two site outliers over the typical rows' median (1)
    assert [r["median_ratio_outlier_typical"] for r in layers] == [1.0, 30.0, 40.0]
    bos = out["bos"]
    assert (bos["rows"], bos["window_starts"], bos["separators_inside_windows"]) == (3, 2, 1)
    assert bos["share_above_ratio_at_site"] == 1.0
    assert bos["median_ratio_to_nonbos_median_at_site"] == 300.0
    assert bos["median_ratio_window_start_at_site"] == 300.0
    assert bos["median_ratio_separator_at_site"] == 50.0
    assert bos["onset_histogram"] == {1: 2, 2: 1}
    example = out["examples"][0]
    assert (example["window"], example["position"], example["before"],
            example["onset_layer"], example["ratio_to_median_at_site"]) == \
        (0, 1, ["t0"], 1, 100.0)


def test_position_bins(report):
    assert [report.position_bin(p) for p in (1, 8, 9, 16, 17, 64, 65, 127)] == \
        ["1", "8", "9-16", "9-16", "17-32", "33-64", "65-128", "65-128"]


def test_layer_norms_are_the_sources_activations(report, tmp_path):
    """One forward with a hook per resid_post, in batches of lm_batch_size, gives each
    layer's row norms as the source computes that layer's rows (the site alone)."""
    from gsae_pl.data.transformer_lens import build_lm_source

    source = build_lm_source(lm_cfg(write_tiny_gpt2(tmp_path / "model"),
                                    write_text(tmp_path / "corpus")))
    tokens = source.heldout[:5]
    source.lm_batch_size = 2  # batches of 2, 2 and 1 windows
    norms = report.layer_norms(source, tokens)
    assert norms.shape == (2, *tokens.shape) and norms.dtype == torch.float64
    for layer in range(2):
        source.hook = f"blocks.{layer}.hook_resid_post"
        torch.testing.assert_close(norms[layer], source.activations(tokens).double().norm(dim=-1))
    out = report.analyse(norms, tokens, source.keep_mask(tokens), site=1,
                         decode=lambda t: source.bridge.tokenizer.decode([t]))
    assert out["site"]["rows"] == int(source.keep_mask(tokens).sum())
    assert out["bos"]["rows"] == int((~source.keep_mask(tokens)).sum())
