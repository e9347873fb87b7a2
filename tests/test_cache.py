"""The activation cache: round trip, the global-batch split, key mismatch, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from gsae_pl.cache import main, write_cache
from gsae_pl.data.cached import CachedSource, build_cached_or_lm_source
from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.errors import UserError
from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_lm")
    return write_tiny_gpt2(root / "model"), write_text(root / "corpus")


@pytest.fixture(scope="module")
def written(lm_files, tmp_path_factory):
    cfg = lm_cfg(*lm_files, "data.cache_rows=600")
    lm = build_lm_source(cfg)
    directory = tmp_path_factory.mktemp("cache") / "acts"
    return lm, directory, write_cache(lm, directory, cfg, progress=False), cfg


def test_round_trip_keeps_every_row_and_records_the_key(written):
    lm, directory, meta, cfg = written
    assert meta["rows"] == 600 and meta["key"] == lm.describe()
    assert json.loads((directory / "metadata.json").read_text()) == meta
    stored = np.concatenate([np.load(directory / s["file"]) for s in meta["shards"]])
    source = CachedSource(directory, lm, seed=0)
    epoch = torch.cat([next(b) for b in [source.train_batches(100, 0, 1)] for _ in range(6)])
    assert torch.equal(epoch.sort(0).values, torch.from_numpy(stored).sort(0).values)
    assert not list(directory.glob(".*tmp*"))  # shards were renamed into place


def test_a_float16_cache_holds_the_same_rows_rounded_in_half_the_bytes(written, tmp_path,
                                                                       monkeypatch):
    """data.cache_dtype=float16: the same shards and batches as float32, each row rounded
    once, read back as float32; half the bytes; its own key, so neither is reused for the
    other."""
    import gsae_pl.cache

    lm, _, _, cfg = written
    monkeypatch.setattr(gsae_pl.cache, "_SHARD_BYTES", 4 * lm.d_in * 256)  # several shards
    metas = {}
    for dtype in ("float32", "float16"):
        run_cfg = lm_cfg(cfg.data.model, cfg.data.dataset, "data.cache_rows=600",
                         f"data.cache_dtype={dtype}")
        metas[dtype] = write_cache(lm, tmp_path / dtype, run_cfg, progress=False)
    full, half = metas["float32"], metas["float16"]
    assert half["dtype"] == "float16" and half["key"]["cache_dtype"] == "float16"
    assert "cache_dtype" not in full["key"]
    assert [s["rows"] for s in half["shards"]] == [s["rows"] for s in full["shards"]]
    assert len(full["shards"]) > 1

    def stored(dtype, meta):
        return np.concatenate([np.load(tmp_path / dtype / s["file"]) for s in meta["shards"]])
    assert stored("float16", half).dtype == np.float16
    assert np.array_equal(stored("float16", half), stored("float32", full).astype(np.float16))
    assert sum(f.stat().st_size for f in (tmp_path / "float16").glob("shard_*")) < \
        0.51 * sum(f.stat().st_size for f in (tmp_path / "float32").glob("shard_*"))
    source = CachedSource(tmp_path / "float16", lm, seed=0, key=half["key"])
    assert source.describe()["cache_dtype"] == "float16"
    full_source = CachedSource(tmp_path / "float32", lm, seed=0)
    for batch, full_batch in zip(source.train_batches(100, 0, 1),
                                 itertools.islice(full_source.train_batches(100, 0, 1), 8)):
        assert batch.dtype == torch.float32 and torch.equal(batch, full_batch.half().float())
    with pytest.raises(UserError, match="was made differently"):
        CachedSource(tmp_path / "float16", lm, seed=0)  # the float32 key: refused


def test_float16_refuses_activations_it_cannot_hold():
    from gsae_pl.cache import _stored

    with pytest.raises(UserError, match="data.cache_dtype=float32"):
        _stored(torch.tensor([[1.0, 7.0e4]]), torch.float16)


def test_normalisation_is_recorded(written):
    _, directory, meta, _ = written
    rows = np.concatenate([np.load(directory / s["file"]) for s in meta["shards"]])
    mean_sq = float((rows.astype(np.float64) ** 2).sum(1).mean())
    norm = meta["normalisation"]
    assert norm["mean_squared_norm"] == pytest.approx(mean_sq, rel=1e-6)
    assert norm["norm_scale"] == pytest.approx(math.sqrt(meta["d_in"] / mean_sq), rel=1e-6)


def test_processes_take_shares_of_the_same_global_batch_and_resume(written):
    lm, directory, _, _ = written
    source = CachedSource(directory, lm, seed=0)
    whole = list(zip(range(8), source.train_batches(100, 0, 1)))
    shares = [list(zip(range(8), source.train_batches(100, r, 2))) for r in range(2)]
    for k in range(8):  # crosses an epoch boundary (6 batches of 100 per epoch)
        assert torch.equal(shares[0][k][1], whole[k][1][0::2])
        assert torch.equal(shares[1][k][1], whole[k][1][1::2])
    assert torch.equal(next(source.train_batches(100, 0, 1, start_step=7)), whole[7][1])


def test_a_cache_of_another_hook_is_refused(written, lm_files):
    _, directory, _, _ = written
    cfg = lm_cfg(*lm_files, "data.cache=true", f"data.cache_dir={directory}",
                 "data.hook=blocks.0.hook_resid_post")
    with pytest.raises(UserError, match="made differently: d_in=128 .*hook=blocks.0.mlp"):
        build_cached_or_lm_source(cfg)


def test_fit_path_reuses_a_matching_cache(written, lm_files):
    _, directory, _, _ = written
    cfg = lm_cfg(*lm_files, "data.cache=true", f"data.cache_dir={directory}")
    source = build_cached_or_lm_source(cfg)
    assert isinstance(source, CachedSource) and source.n_rows == 600


def test_cli_writes_once_and_refuses_other_sources(lm_files, tmp_path, capsys):
    model, corpus = lm_files
    args = ["--config", str(tmp_path / "c.yaml"), f"data.cache_dir={tmp_path / 'acts'}",
            "data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
            "data.context_size=16", "eval.rows=64", "eval.lm_contexts=4", "data.cache_rows=300",
            "data.buffer_size=256", "data.batch_size=32"]
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    assert main(args) == 0 and (tmp_path / "acts" / "metadata.json").exists()
    assert main(args) == 0 and "already holds this cache" in capsys.readouterr().out
    assert main(["--config", str(tmp_path / "c.yaml"), "data.source=synthetic"]) == 2
    assert "not cached" in capsys.readouterr().err
