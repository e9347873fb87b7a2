"""The activation cache: round trip, the global-batch split, key mismatch, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import re
import threading

import numpy as np
import pytest
import torch

from gsae_pl.cache import main
from gsae_pl.data.base import train_stream
from gsae_pl.data.cache import CachedSource, read_metadata, write_cache
from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.errors import UserError
from gsae_pl.run.datamodule import build_source
from tests.conftest import make_cfg
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


def _opened(lm, cfg, directory) -> CachedSource:
    source = CachedSource(lm, cfg, directory)
    source.prepare(progress=False)
    return source


def test_round_trip_keeps_every_row_and_records_the_key(written):
    lm, directory, meta, cfg = written
    assert meta["rows"] == 600 and meta["key"] == lm.describe()
    assert json.loads((directory / "metadata.json").read_text()) == meta
    stored = np.concatenate([np.load(directory / s["file"]) for s in meta["shards"]])
    source = _opened(lm, cfg, directory)
    epoch = torch.cat([next(b) for b in [train_stream(source, 100, 0, 1)] for _ in range(6)])
    assert torch.equal(epoch.sort(0).values, torch.from_numpy(stored).sort(0).values)
    assert not list(directory.glob(".*tmp*"))  # shards were renamed into place


def test_a_float16_cache_holds_the_same_rows_rounded_in_half_the_bytes(written, tmp_path,
                                                                       monkeypatch):
    """data.cache_dtype=float16: the same shards and batches as float32, each row rounded
    once, read back as float32; half the bytes; its own key, so neither is reused for the
    other."""
    import gsae_pl.data.cache

    lm, _, _, cfg = written
    monkeypatch.setattr(gsae_pl.data.cache, "_SHARD_BYTES", 4 * lm.d_in * 256)  # several shards
    metas, cfgs = {}, {}
    for dtype in ("float32", "float16"):
        cfgs[dtype] = lm_cfg(cfg.data.model, cfg.data.dataset, "data.cache_rows=600",
                             f"data.cache_dtype={dtype}")
        metas[dtype] = write_cache(lm, tmp_path / dtype, cfgs[dtype], progress=False)
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
    source = _opened(lm, cfgs["float16"], tmp_path / "float16")
    assert source.describe()["cache_dtype"] == "float16"
    full_source = _opened(lm, cfgs["float32"], tmp_path / "float32")
    for batch, full_batch in zip(train_stream(source, 100, 0, 1),
                                 itertools.islice(train_stream(full_source, 100, 0, 1), 8)):
        assert batch.dtype == torch.float32 and torch.equal(batch, full_batch.half().float())
    with pytest.raises(UserError, match="was made differently"):
        CachedSource(lm, cfgs["float32"], tmp_path / "float16")  # the float32 key: refused


def test_float16_refuses_activations_it_cannot_hold():
    from gsae_pl.data.cache import _stored

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
    lm, directory, _, cfg = written
    source = _opened(lm, cfg, directory)
    whole = list(zip(range(8), train_stream(source, 100, 0, 1)))
    shares = [list(zip(range(8), train_stream(source, 100, r, 2))) for r in range(2)]
    for k in range(8):  # crosses an epoch boundary (6 batches of 100 per epoch)
        assert torch.equal(shares[0][k][1], whole[k][1][0::2])
        assert torch.equal(shares[1][k][1], whole[k][1][1::2])
    assert torch.equal(next(train_stream(source, 100, 0, 1, start_step=7)), whole[7][1])


def test_a_cache_of_another_hook_is_refused(written, lm_files):
    _, directory, _, _ = written
    cfg = lm_cfg(*lm_files, "data.cache=true", f"data.cache_dir={directory}",
                 "data.hook=blocks.0.hook_resid_post")
    with pytest.raises(UserError, match="made differently: d_in=128 .*hook=blocks.0.mlp"):
        build_source(cfg)  # before anything is read or written


def test_fit_path_reuses_a_matching_cache(written, lm_files):
    _, directory, _, _ = written
    cfg = lm_cfg(*lm_files, "data.cache=true", f"data.cache_dir={directory}")
    source = build_source(cfg)
    source.prepare()
    assert isinstance(source, CachedSource) and source.n_rows == 600


def test_cli_writes_once_and_refuses_other_sources(lm_files, tmp_path, capsys):
    model, corpus = lm_files
    args = ["--config", str(tmp_path / "c.yaml"), f"data.cache_dir={tmp_path / 'acts'}",
            "data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
            "data.context_size=16", "eval.rows=64", "eval.loss_recovered.contexts=4",
            "data.cache_rows=300", "data.buffer_size=256", "data.batch_size=32"]
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    assert main(args) == 0 and (tmp_path / "acts" / "metadata.json").exists()
    assert main(args) == 0 and "already holds this cache" in capsys.readouterr().out
    assert main(["--config", str(tmp_path / "c.yaml"), "data.source=synthetic"]) == 2
    assert "not cached" in capsys.readouterr().err


class _RowsLM:
    """What the cache writer asks of an LM source: a key, a width and a row stream."""

    d_in, buffer_size = 4, 64

    def __init__(self, fail: bool = False):
        self.fail, self.streams = fail, 0

    def describe(self) -> dict:
        return {"hook": "fake.hook", "model": "none"}

    def process_batches(self, batch, start, rank, world):
        self.streams += 1
        if self.fail:
            raise UserError("bad activations")
        gen = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(batch, self.d_in, generator=gen)


def _in_thread(call):
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    return thread, result


def test_a_process_that_finds_a_cache_being_written_waits_and_reads_it(tmp_path):
    """Two processes reach a missing cache: the one that locks first writes it, the other
    blocks on its lock (no polling) and then reads it without writing."""
    from gsae_pl.data.cache import _write_lock, ensure_cache

    folder, cfg, waiter = tmp_path / "acts", make_cfg("data.cache_rows=100"), _RowsLM()
    with _write_lock(folder):  # the other process, writing
        thread, result = _in_thread(lambda: ensure_cache(waiter, folder, cfg, progress=False))
        thread.join(0.5)
        assert thread.is_alive() and not (folder / "metadata.json").exists()
        write_cache(_RowsLM(), folder, cfg, progress=False)
    thread.join(30)
    meta, wrote = result["value"]
    assert not wrote and meta["rows"] == 100 and waiter.streams == 0


def test_a_failed_writer_leaves_no_cache_and_the_next_process_writes_it(tmp_path):
    from gsae_pl.data.cache import ensure_cache

    folder, cfg = tmp_path / "acts", make_cfg("data.cache_rows=100")
    with pytest.raises(UserError, match="bad activations"):
        ensure_cache(_RowsLM(fail=True), folder, cfg, progress=False)
    assert not (folder / "metadata.json").exists()
    meta, wrote = ensure_cache(_RowsLM(), folder, cfg, progress=False)
    assert wrote and meta["rows"] == 100


def test_the_datamodule_writes_a_missing_cache_before_fit_and_once(lm_files, tmp_path):
    """prepare_data writes it; the constructor calls it, since fit's normalisation sample
    is the cache's first rows; Lightning's own call (global rank 0 only) finds it done."""
    from gsae_pl.run.datamodule import SAEDataModule

    cfg = lm_cfg(*lm_files, "data.cache=true", f"data.cache_dir={tmp_path / 'acts'}",
                 "data.cache_rows=300", "data.normalize_rows=64")
    dm = SAEDataModule(cfg)
    meta = json.loads((tmp_path / "acts" / "metadata.json").read_text())
    assert meta["rows"] == 300 and not dm.prepare_data_per_node
    assert torch.equal(dm.sample_rows(64), next(train_stream(dm.source, 64)))
    dm.prepare_data()
    assert json.loads((tmp_path / "acts" / "metadata.json").read_text()) == meta


@pytest.mark.slow  # ~7 s: an ablate process writes the cache
def test_ablate_writes_a_suites_cache_once_before_its_runs(lm_files, tmp_path):
    """ablate's prepare_caches: one `python -m gsae_pl.cache` per distinct cache, with
    rows for the longest of its runs (rows_wanted)."""
    from types import SimpleNamespace

    from gsae_pl.config import load_config
    from gsae_pl.suite.launcher import prepare_caches

    model, corpus = lm_files
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    overrides = ("data.source=transformer_lens", f"data.model={model}",
                 f"data.dataset={corpus}", "data.context_size=16", "eval.rows=64",
                 "eval.loss_recovered.contexts=4", "data.buffer_size=256", "data.batch_size=32",
                 "data.cache=true", f"data.cache_dir={tmp_path / 'acts'}")
    runs = [SimpleNamespace(config_paths=(tmp_path / "c.yaml",), overrides=(*overrides, steps),
                            cfg=load_config(tmp_path / "c.yaml", [*overrides, steps]))
            for steps in ("trainer.max_steps=5", "trainer.max_steps=9")]
    prepare_caches(runs, tmp_path)
    assert read_metadata(tmp_path / "acts")["rows"] == 9 * 32


def test_the_buffer_holds_no_more_than_the_rows_cached_and_its_fill_reports(
        lm_files, tmp_path, monkeypatch, capsys):
    """A 4096-row buffer for a 300-row cache filled 4096 rows silently before the first
    was written (the SmolLM2 cache: 0% for 11 minutes); now the buffer holds 300 and its
    fill, like the writing, prints lines with the rows, the rate and the ETA."""
    monkeypatch.setenv("GSAE_PL_PROGRESS_EVERY", "0")  # a line at every update
    cfg = lm_cfg(*lm_files, "data.cache_rows=300", "data.buffer_size=4096")
    lm = build_lm_source(cfg)
    computed, rows = [], lm.rows
    monkeypatch.setattr(lm, "rows", lambda tokens: computed.append(rows(tokens)) or
                        computed[-1])
    assert write_cache(lm, tmp_path / "acts", cfg)["rows"] == 300
    per_lm_batch = 8 * 16  # data.lm_batch_size windows of data.context_size tokens
    assert sum(map(len, computed)) < 300 + per_lm_batch
    assert lm.buffer_size == 4096  # the run's own setting, back after the write
    err = capsys.readouterr().err.splitlines()
    fill = [line for line in err if line.startswith("filling the shuffle buffer")]
    assert fill and all(re.match(r"filling the shuffle buffer \(data.buffer_size\): "
                                 r"[\d.]+k?(/300 rows \(\d+%\) \| [\d.]+k? rows/s \| ETA "
                                 r"\d+:\d\d| rows in \d+:\d\d)$", line) for line in fill), fill
    assert any(line.startswith("caching ") and "/300 rows (100%)" in line for line in err)
