"""Write LM activations to disk once: `python -m gsae_pl.cache --config FILE [key=value ...]`.

The same config a run uses names the source (`data.source` tiny_lm or transformer_lens) and
the folder (`data.cache_dir`, or by default one under $GSAE_PL_CACHE/activations named by
a hash of the key). `fit` with `data.cache=true` writes the cache itself when it is
missing, then trains from it (data/cached.py).

Nothing half-written: every shard is saved under a temporary name and renamed, and
`metadata.json` (key, rows, shards, normalisation) is written last, so a folder without
it is not a cache. An error midway removes the shards this attempt wrote.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gsae_pl.cli import ArgumentParser, add_config_arguments, parse_config_arguments, run_main
from gsae_pl.config import load_config
from gsae_pl.data.cached import cache_key, check_key, default_cache_dir, read_metadata
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_save_npy, atomic_write_json, sweep_stale_temporaries

_SHARD_BYTES = 64 * 2**20  # ~64 MB shards: big sequential reads, many shards to shuffle
_WRITE_BATCH = 8192  # rows taken from the source per step of the progress bar


def rows_wanted(cfg) -> int:
    """data.cache_rows, or enough for one pass of the run: max_steps global batches."""
    if cfg.data.cache_rows:
        return int(cfg.data.cache_rows)
    return int(cfg.trainer.max_steps) * int(cfg.data.batch_size)


def write_cache(lm, directory: Path, cfg, progress: bool = True) -> dict:
    """Stream `rows_wanted(cfg)` training rows of `lm` into shards; return the metadata."""
    directory, n_rows = Path(directory), rows_wanted(cfg)
    if directory.is_dir():
        sweep_stale_temporaries(directory)  # half a shard of a killed write, if any
    key, d_in, dtype = cache_key(lm, cfg), lm.d_in, getattr(torch, cfg.data.cache_dtype)
    # Batches no bigger than half the buffer, so the first arrives after one buffer fill.
    step = max(1, min(_WRITE_BATCH, lm.buffer_size // 2, n_rows))
    # Shards sized by float32 rows whatever the dtype: the shard count sets each epoch's
    # order, so a float16 cache gives the same batches as a float32 one, rounded.
    shard_rows = max(step, _SHARD_BYTES // (4 * d_in) // step * step)
    batches = lm.train_batches(step, 0, 1)
    shards, pending, written = [], [], 0
    sum_sq, start = 0.0, time.perf_counter()
    bar = tqdm(total=n_rows, desc=f"caching {key['hook']}", unit="row", unit_scale=True,
               disable=not progress, file=sys.stderr)
    try:
        while written < n_rows:
            rows = _stored(next(batches)[: n_rows - written].cpu(), dtype)
            sum_sq += float(rows.double().pow(2).sum())  # of the rows as stored
            pending.append(rows)
            written += len(rows)
            bar.update(len(rows))
            if sum(len(p) for p in pending) >= shard_rows or written >= n_rows:
                shards.append(_save_shard(directory, len(shards), torch.cat(pending)))
                pending = []
    except BaseException:
        for shard in shards:
            (directory / shard["file"]).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    mean_sq = sum_sq / written
    meta = {"key": key, "rows": written, "d_in": d_in, "dtype": cfg.data.cache_dtype,
            "shards": shards,
            "tokens": written, "seconds": round(time.perf_counter() - start, 2),
            "normalisation": {"mean_squared_norm": mean_sq,  # docs/method.md sec. 4
                              "norm_scale": math.sqrt(d_in / mean_sq)}}
    atomic_write_json(directory / "metadata.json", meta)  # last: marks the cache complete
    return meta


def _stored(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`rows` in the cache's dtype; float16 refuses values it cannot hold rather than
    storing inf (its largest is 65504; residual streams can carry outliers)."""
    if dtype == torch.float32:
        return rows
    if rows.abs().max() > torch.finfo(dtype).max:
        raise UserError(f"an activation of {float(rows.abs().max()):.4g} does not fit "
                        f"data.cache_dtype={str(dtype).split('.')[-1]} (largest "
                        f"{torch.finfo(dtype).max:g}): use data.cache_dtype=float32")
    return rows.to(dtype)


def _save_shard(directory: Path, index: int, rows: torch.Tensor) -> dict:
    name = f"shard_{index:05d}.npy"
    atomic_save_npy(directory / name, rows.numpy())
    return {"file": name, "rows": len(rows)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.cache", description=__doc__)
    add_config_arguments(parser)
    return parse_config_arguments(parser, argv)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.data.source not in ("tiny_lm", "transformer_lens"):
        raise UserError(f"data.source={cfg.data.source} is read directly, not cached: the "
                        "cache is for data.source=tiny_lm or transformer_lens")
    from gsae_pl.data.transformer_lens import build_lm_source

    lm = build_lm_source(cfg)
    key = cache_key(lm, cfg)
    directory = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(key)
    meta = read_metadata(directory)
    if meta is not None:
        check_key(directory, meta, key)
        print(f"{directory}: already holds this cache ({meta['rows']} rows); reusing it")
        return 0
    meta = write_cache(lm, directory, cfg)
    gb = meta["rows"] * meta["d_in"] * torch.finfo(getattr(torch, meta["dtype"])).bits / 8e9
    print(f"{directory}: {meta['rows']} rows x {meta['d_in']} ({gb:.2f} GB) in "
          f"{meta['seconds']} s; norm_scale {meta['normalisation']['norm_scale']:.4g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
