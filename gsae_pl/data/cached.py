"""Training from a disk cache of LM activations (`data.cache=true`; written by gsae_pl/cache.py).

A cache is a folder of .npy shards plus `metadata.json`, which holds the key (what made
the activations: model, hook, dataset, context, BOS rule, dtype, held-out text), the row
count and the normalisation estimate. It is reused when the key matches this run's and
refused, with the differences named, when it does not.

Reading: shards are memory-mapped; each epoch visits them in a new seeded order and reads
contiguous slices, so throughput approaches memory speed (benchmarks/RESULTS.md). Rows
were already mixed by the shuffle buffer when the cache was written. Global batch k is a
pure function of (seed, k), and process r of W takes its rows r::W, exactly like the
synthetic and file sources (data/base.py). Held-out rows and loss recovered still come
from the LM on held-out text, which the cache never holds; only the SAE-independent part of
loss recovered (CE clean and zero-ablated per held-out window) is kept in its
`reference_ce/` subfolder, written by the first run that needs it (gsae_pl/lm_eval.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gsae_pl.data.base import check_split
from gsae_pl.data.synthetic import stream_seed
from gsae_pl.data.transformer_lens import TransformerLensSource, build_lm_source
from gsae_pl.errors import UserError

METADATA = "metadata.json"
REFERENCE_CE = "reference_ce"  # a subfolder: lm_eval's clean / zero-ablated CE per window


def read_metadata(directory: Path) -> dict | None:
    path = Path(directory) / METADATA
    return json.loads(path.read_text()) if path.is_file() else None


def check_key(directory: Path, meta: dict, key: dict) -> None:
    """Refuse a cache made by something else, naming what differs."""
    if meta.get("key") == key:
        return
    theirs = meta.get("key", {})
    diff = [f"{k}={theirs.get(k)} (this run: {key.get(k)})"
            for k in sorted(set(theirs) | set(key)) if theirs.get(k) != key.get(k)]
    raise UserError(f"the activation cache in {directory} was made differently: "
                    f"{'; '.join(diff)}: point data.cache_dir elsewhere or delete that folder")


class CachedSource:
    """An ActivationSource (see base.py) over a cache folder; the LM source stays for
    held-out rows and loss recovered."""

    true_features = None

    def __init__(self, directory: Path, lm: TransformerLensSource, seed: int,
                 key: dict | None = None):
        self.directory, self.lm, self.seed = Path(directory), lm, int(seed)
        meta = read_metadata(self.directory)
        if meta is None:
            raise UserError(f"{self.directory} holds no complete activation cache "
                            "(no metadata.json): run python -m gsae_pl.cache --config FILE")
        check_key(self.directory, meta, lm.describe() if key is None else key)
        # Held-out CE clean and zero-ablated, computed once for every run that reads this
        # cache (gsae_pl/lm_eval.py).
        lm.reference_dir = self.directory / REFERENCE_CE
        self.meta = meta
        self.shards = [np.load(self.directory / s["file"], mmap_mode="r") for s in meta["shards"]]
        self.n_rows, self.d_in = sum(len(s) for s in self.shards), int(meta["d_in"])

    def set_device(self, device) -> None:
        self.lm.set_device(device)

    def eval_rows(self, n_rows: int) -> Tensor:
        return self.lm.eval_rows(n_rows)

    def describe(self) -> dict:
        stored = self.meta.get("dtype", "float32")
        return {**self.lm.describe(), "cache": str(self.directory), "cache_rows": self.n_rows,
                **({"cache_dtype": stored} if stored != "float32" else {})}

    def train_batches(self, batch_size: int, rank: int, world_size: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        check_split(batch_size, rank, world_size)
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise UserError(f"the cache in {self.directory} has {self.n_rows} rows, fewer than "
                            f"one batch of {batch_size}: raise data.cache_rows")
        return self._batches(batch_size, rank, world_size, *divmod(start_step, per_epoch))

    def _batches(self, batch_size: int, rank: int, world_size: int, epoch: int,
                 k: int) -> Iterator[Tensor]:
        per_epoch = self.n_rows // batch_size
        while True:
            reader = _RowReader(self._epoch_rows(epoch, k * batch_size))
            for _ in range(k, per_epoch):
                yield reader.take(batch_size)[rank::world_size].contiguous()
            epoch, k = epoch + 1, 0

    def _epoch_rows(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """Contiguous row blocks of the epoch's shard order, from row `skip` on."""
        gen = torch.Generator().manual_seed(stream_seed(self.seed, "cache-epoch", epoch))
        for i in torch.randperm(len(self.shards), generator=gen).tolist():
            shard = self.shards[i]
            if skip >= len(shard):
                skip -= len(shard)
                continue
            yield shard[skip:]
            skip = 0


class _RowReader:
    """Takes `n` rows at a time from a stream of contiguous blocks, across block ends."""

    def __init__(self, blocks: Iterator[np.ndarray]):
        self.blocks, self.pending = blocks, None

    def take(self, n: int) -> Tensor:
        parts, got = [], 0
        while got < n:
            block = self.pending if self.pending is not None else next(self.blocks)
            part = block[: n - got]
            self.pending = block[len(part):] if len(block) > len(part) else None
            parts.append(part)
            got += len(part)
        # One copy out of the memory map (np.concatenate); float16 caches become float32.
        return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))


def cache_key(lm, cfg) -> dict:
    """What a cache holds: the LM's activations (`describe`), and the storage dtype when it
    is not float32 (only then, so the keys of caches made before it existed still match)."""
    key = lm.describe()
    if cfg.data.cache_dtype != "float32":
        key["cache_dtype"] = cfg.data.cache_dtype
    return key


def default_cache_dir(key: dict) -> Path:
    from hashlib import blake2b

    from gsae_pl.tiny_lm import cache_root

    digest = blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return cache_root() / "activations" / digest


def _is_launcher_process() -> bool:
    """True in the process that writes a missing cache: rank 0, or no DDP launcher yet."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def build_cached_or_lm_source(cfg):
    """The LM source, or (data.cache=true) a CachedSource over it, writing the cache first
    when it is missing; DDP processes other than rank 0 wait for rank 0's cache."""
    lm = build_lm_source(cfg)
    if not cfg.data.cache:
        return lm
    key = cache_key(lm, cfg)
    directory = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(key)
    meta = read_metadata(directory)
    if meta is not None:
        check_key(directory, meta, key)
        from gsae_pl.cache import rows_wanted

        if meta["rows"] < rows_wanted(cfg) and _is_launcher_process():
            print(f"note: the cache in {directory} holds {meta['rows']} rows and this run "
                  f"reads {rows_wanted(cfg)}: its rows repeat (raise data.cache_rows and "
                  "delete the folder for fresh ones)", file=sys.stderr)
    elif _is_launcher_process():
        from gsae_pl.cache import write_cache

        write_cache(lm, directory, cfg)
    else:
        while read_metadata(directory) is None:
            time.sleep(2)
    return CachedSource(directory, lm, cfg.seed, key)
