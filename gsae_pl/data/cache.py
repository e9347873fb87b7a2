"""The activation cache: LM activations written to disk once, then read by every run whose
key matches (`data.cache=true`; `python -m gsae_pl.cache --config FILE [key=value ...]`
writes one ahead of the runs).

A cache is a folder of .npy shards plus `metadata.json`, which holds the key (what made
the activations: model, hook, dataset, context, BOS rule, dtype, held-out text), the row
count and the normalisation estimate. It is reused when the key matches this run's and
refused, with the differences named, when it does not. The folder is `data.cache_dir`, or
by default one under $GSAE_PL_CACHE/activations named by a hash of the key.

Writing: nothing half-written. Every shard is saved under a temporary name and renamed, and
`metadata.json` is written last, so a folder without it is not a cache; an error midway
removes the shards this attempt wrote.

Who writes, and how the others wait (decision). The DataModule's `prepare_data` writes a
missing cache (`CachedSource.prepare`). Lightning calls that hook only inside
`Trainer.fit`, but fit needs the cache before: the normalisation sample is the cache's first
rows, and rows the cache cannot hold (float16 overflow) or an unwritable folder must be
refused before the run directory is written. So the DataModule also calls `prepare_data`
from its constructor, in every process, and Lightning's own call finds the cache complete.
Without a process group yet, processes agree through the filesystem: the writer holds an
exclusive `fcntl.flock` on `<cache>/.write.lock` while it writes, and any other process that
finds no `metadata.json` blocks on that lock, then finds the cache complete (or, if the
writer failed, writes it itself and meets the same error) -- no polling, and on a shared
filesystem with locks this holds across nodes too. Whichever process locks first writes;
the rows are the same, since they are a pure function of the config. The lock file stays
(empty): deleting a lock file that others may hold open is a race (gsae_pl/run/lock.py).

Checked on open (decision): a cache is a folder anyone can edit, copy half of, or fill with
other arrays, and metadata.json alone would be believed (shards cut to 100 rows trained as
if they held 400; int32 shards under float32 metadata trained to FVU 1351, exit 0). So
every open checks metadata.json's own form, then each shard's file against it: present,
an .npy header with the recorded rows, width and dtype, the size that header implies (a
cut file), and a digest of a fixed sample of its rows against the one recorded when it was
written. A sample, not the whole shard: the whole cache would be read once more before
every run, where the cache exists to make the start cheap; the sample catches a shard
rewritten or swapped for another, and the whole-shard digests recorded beside it identify
the cache in a run's record (gsae_pl/run/inputs.py: a resume refuses a cache rebuilt with
other rows). Caches written before the digests existed are checked without them. Any
mismatch is one line naming the file: delete the folder and the next run rebuilds it.

Reading: shards are memory-mapped; each epoch visits them in a new seeded order and reads
contiguous slices, so throughput approaches memory speed (benchmarks/RESULTS.md). Rows
were already mixed by the shuffle buffer when the cache was written, and global batch k is
a pure function of (seed, k) (data/base.py deals it out to the processes). Held-out rows and
loss recovered still come from the LM on held-out text, which the cache never holds; only
the SAE-independent part of loss recovered (CE clean and zero-ablated per held-out window)
is kept in its `reference_ce/` subfolder, written by the first run that needs it
(gsae_pl/eval/lm_eval.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from hashlib import blake2b
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gsae_pl.commands import python_m
from gsae_pl.data.base import SOURCES, epoch_batches, train_stream
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_save_npy, atomic_write_json, sweep_stale_temporaries
from gsae_pl.processes import is_first_process
from gsae_pl.progress_lines import ProgressLines
from gsae_pl.seeds import stream_seed

METADATA = "metadata.json"
REFERENCE_CE = "reference_ce"  # a subfolder: lm_eval's clean / zero-ablated CE per window
WRITE_LOCK = ".write.lock"  # held by the process writing the cache
_SHARD_BYTES = 64 * 2**20  # ~64 MB shards: big sequential reads, many shards to shuffle
_WRITE_BATCH = 8192  # rows taken from the source per step of the progress bar
_SAMPLE_ROWS = 64  # rows per shard whose digest every open checks (module docstring)
_SHARD_NAME = re.compile(r"shard_\d{5}\.npy")  # what _save_shard names them; nothing else


# ---- the key and the folder ------------------------------------------------------------
def cache_key(lm, cfg) -> dict:
    """What a cache holds: the LM's activations (`describe`), and the storage dtype when it
    is not float32 (only then, so the keys of caches made before it existed still match)."""
    key = lm.describe()
    if cfg.data.cache_dtype != "float32":
        key["cache_dtype"] = cfg.data.cache_dtype
    return key


def default_cache_dir(key: dict) -> Path:
    from hashlib import blake2b

    from gsae_pl.cache_root import cache_root

    digest = blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return cache_root() / "activations" / digest


def cache_dir(lm, cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(
        cache_key(lm, cfg))


def read_metadata(directory: Path) -> dict | None:
    """The cache's metadata.json, None where there is none (not a cache yet); one that is
    not what write_cache writes is refused (module docstring: checked on open)."""
    path = Path(directory) / METADATA
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _damaged(path, f"cannot be read ({reason})") from None
    problem = _metadata_problem(meta)
    if problem:
        raise _damaged(path, problem)
    return meta


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(f"the activation cache file {path} {problem}: delete the folder "
                     f"{path.parent} and the next run rebuilds the cache")


def _metadata_problem(meta) -> str | None:
    """What is wrong with a metadata.json's form, or None."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(meta, dict):
        return f"holds a {type(meta).__name__}, not the cache's metadata"
    missing = [k for k in ("key", "rows", "d_in", "dtype", "shards") if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(meta["key"], dict):
        return "has a key that is not a mapping"
    if not (is_int(meta["rows"]) and is_int(meta["d_in"]) and meta["d_in"] > 0):
        return f"has rows={meta['rows']!r}, d_in={meta['d_in']!r}: expected counts"
    if meta["dtype"] not in ("float32", "float16"):
        return f"has dtype={meta['dtype']!r}: expected float32 or float16"
    shards = meta["shards"]
    if not (isinstance(shards, list) and shards and all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and is_int(e.get("rows"))
            and e["rows"] > 0 and _SHARD_NAME.fullmatch(e["file"]) for e in shards)):
        return "has a shard list that is not [{file: shard_NNNNN.npy, rows: N > 0}, ...]"
    if sum(e["rows"] for e in shards) != meta["rows"]:
        return (f"says rows={meta['rows']} but its shards hold "
                f"{sum(e['rows'] for e in shards)}")
    return None


def check_key(directory: Path, meta: dict, key: dict) -> None:
    """Refuse a cache made by something else, naming what differs."""
    if meta.get("key") == key:
        return
    theirs = meta.get("key", {})
    diff = [f"{k}={theirs.get(k)} (this run: {key.get(k)})"
            for k in sorted(set(theirs) | set(key)) if theirs.get(k) != key.get(k)]
    raise UserError(f"the activation cache in {directory} was made differently: "
                    f"{'; '.join(diff)}: point data.cache_dir elsewhere or delete that folder")


def check_cache_dir(cfg) -> None:
    """Before the LM runs: a cache folder that cannot be written would otherwise fail after
    the first shard's worth of LM passes. A complete cache is only read."""
    from gsae_pl.writable import check_writable_dir

    data = cfg.data
    if data.cache and data.cache_dir and read_metadata(data.cache_dir) is None:
        check_writable_dir(data.cache_dir, "data.cache_dir")


def rows_wanted(cfg) -> int:
    """data.cache_rows, or enough for one pass of the run: max_steps global batches."""
    if cfg.data.cache_rows:
        return int(cfg.data.cache_rows)
    return int(cfg.trainer.max_steps) * int(cfg.data.batch_size)


# ---- writing ---------------------------------------------------------------------------
def ensure_cache(lm, directory: Path, cfg, progress: bool = True) -> tuple[dict, bool]:
    """The cache's metadata, and whether this call wrote it; one process writes a missing
    cache while the others wait on its lock (module docstring)."""
    directory = Path(directory)
    meta, wrote = read_metadata(directory), False
    if meta is None:
        with _write_lock(directory):
            meta = read_metadata(directory)  # another process may have written it meanwhile
            if meta is None:
                meta, wrote = write_cache(lm, directory, cfg, progress), True
    check_key(directory, meta, cache_key(lm, cfg))
    return meta, wrote


@contextmanager
def _write_lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / WRITE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish the activation cache in "
                  f"{directory}", file=sys.stderr, flush=True)
            _flock(fd, directory)
        except OSError as err:
            _refuse_unlockable(err, directory)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, directory: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        _refuse_unlockable(err, directory)


def _refuse_unlockable(err: OSError, directory: Path) -> None:
    reason = err.strerror or errno.errorcode.get(err.errno, type(err).__name__)
    raise UserError(f"cannot lock the activation cache in {directory} ({reason}): write it "
                    f"first with {python_m('gsae_pl.cache')} --config FILE") from None


def write_cache(lm, directory: Path, cfg, progress: bool = True) -> dict:
    """Stream `rows_wanted(cfg)` training rows of `lm` into shards; return the metadata.
    Unlocked: `ensure_cache` is the way in for anything that may run beside another writer."""
    directory, n_rows = Path(directory), rows_wanted(cfg)
    if directory.is_dir():
        sweep_stale_temporaries(directory)  # half a shard of a killed write, if any
    # Batches no bigger than half the buffer, so the first arrives after one buffer fill;
    # and the buffer no bigger than the rows cached, in whole batches: a larger one would
    # compute rows never written before the first is (131,072 for a 102k-row cache).
    step = max(1, min(_WRITE_BATCH, lm.buffer_size // 2, n_rows))
    with capped_buffer(lm, -(-n_rows // step) * step):
        return _write(lm, directory, cfg, n_rows, step, progress)


@contextmanager
def capped_buffer(lm, rows: int):
    """`lm`'s shuffle buffer (data.buffer_size) at most `rows` rows while in the block."""
    kept = lm.buffer_size
    lm.buffer_size = min(kept, rows)
    try:
        yield
    finally:
        lm.buffer_size = kept


def _write(lm, directory: Path, cfg, n_rows: int, step: int, progress: bool) -> dict:
    key, d_in, dtype = cache_key(lm, cfg), lm.d_in, getattr(torch, cfg.data.cache_dtype)
    # Shards sized by float32 rows whatever the dtype: the shard count sets each epoch's
    # order, so a float16 cache gives the same batches as a float32 one, rounded.
    shard_rows = max(step, _SHARD_BYTES // (4 * d_in) // step * step)
    batches = train_stream(lm, step)  # one process's stream: the cache is the same for all
    shards, pending, written = [], [], 0
    sum_sq, start = 0.0, time.perf_counter()
    bar = ProgressLines(f"caching {key['hook']}", total=n_rows, unit="rows",
                        speak=None if progress else False)
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
    atomic_write_json(directory / METADATA, meta)  # last: marks the cache complete
    return meta


def _stored(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """`rows` in the cache's dtype; float16 refuses values it cannot hold rather than
    storing inf (its largest is 65504; residual streams can carry outliers)."""
    if dtype == torch.float32:
        return rows
    if rows.abs().max() > torch.finfo(dtype).max:
        raise UserError(f"an activation of {float(rows.abs().max()):.4g} does not fit "
                        f"data.cache_dtype={str(dtype).split('.')[-1]} (largest "
                        f"{torch.finfo(dtype).max:g}): use data.cache_dtype=float32")
    return rows.to(dtype)


def _save_shard(directory: Path, index: int, rows: Tensor) -> dict:
    """Save one shard; its entry in metadata.json: file, rows, and the digests of all its
    rows and of the sample every open checks (module docstring)."""
    name, array = f"shard_{index:05d}.npy", rows.numpy()
    atomic_save_npy(directory / name, array)
    return {"file": name, "rows": len(rows), "blake2b": _digest(array),
            "sample_blake2b": _digest(array[_sample_index(len(array))])}


def _digest(rows: np.ndarray) -> str:
    """blake2b of the rows' values as stored (C order, little-endian)."""
    stored = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    return blake2b(stored.tobytes(), digest_size=16).hexdigest()


def _sample_index(n_rows: int) -> np.ndarray:
    """Up to _SAMPLE_ROWS rows spread evenly over a shard, its first and last included."""
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, _SAMPLE_ROWS)).round()
                     .astype(np.int64))


def open_shard(directory: Path, entry: dict, d_in: int, dtype: str) -> np.ndarray:
    """One shard, memory-mapped, once its file matches its metadata.json entry."""
    path, rows = Path(directory) / entry["file"], entry["rows"]
    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        shard = np.load(path, mmap_mode="r")  # allow_pickle=False: object arrays refused
    except Exception as err:  # numpy's errors for a cut or foreign file vary
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _damaged(path, f"cannot be read as .npy ({reason})") from None
    if shard.shape != (rows, d_in) or shard.dtype != np.dtype(dtype):
        raise _damaged(path, f"holds {shard.dtype} {list(shard.shape)} where metadata.json "
                       f"records {dtype} [{rows}, {d_in}]")
    if path.stat().st_size != shard.offset + shard.nbytes:
        raise _damaged(path, f"is {path.stat().st_size} bytes where its header implies "
                       f"{shard.offset + shard.nbytes}")
    recorded = entry.get("sample_blake2b")  # absent in caches written before it was
    if recorded is not None and _digest(shard[_sample_index(rows)]) != recorded:
        raise _damaged(path, "holds other rows than the cache recorded (its sample digest "
                       "differs)")
    return shard


def cache_digest(meta: dict) -> str:
    """One digest naming a cache's rows: its shards' entries (the whole-shard digests, where
    recorded) and dtype."""
    text = json.dumps({"dtype": meta["dtype"], "d_in": meta["d_in"], "shards": meta["shards"]},
                      sort_keys=True)
    return blake2b(text.encode(), digest_size=16).hexdigest()


# ---- reading ---------------------------------------------------------------------------
class CachedSource:
    """An ActivationSource (see base.py) over the cache of `lm`'s activations; the LM stays
    for held-out rows and loss recovered. `prepare()` (the DataModule's prepare_data) writes
    the cache if it is missing and opens it; a cache made differently is refused at once."""

    true_features = None

    def __init__(self, lm, cfg, directory: Path | None = None):
        self.lm, self.cfg, self.seed = lm, cfg, int(cfg.seed)
        self.key, self.d_in = cache_key(lm, cfg), int(lm.d_in)
        self.directory = Path(directory) if directory else cache_dir(lm, cfg)
        meta = read_metadata(self.directory)
        if meta is not None:
            check_key(self.directory, meta, self.key)
        # Held-out CE clean and zero-ablated, computed once for every run that reads this
        # cache (gsae_pl/eval/lm_eval.py).
        lm.reference_dir = self.directory / REFERENCE_CE
        self.meta: dict | None = None
        self.shards: list[np.ndarray] = []

    def prepare(self, progress: bool = True) -> None:
        """Write the cache if it is missing (module docstring: who writes), then open it."""
        if self.meta is not None:
            return
        meta, _ = ensure_cache(self.lm, self.directory, self.cfg, progress)
        if meta["rows"] < rows_wanted(self.cfg) and is_first_process():
            print(f"note: the cache in {self.directory} holds {meta['rows']} rows and this "
                  f"run reads {rows_wanted(self.cfg)}: its rows repeat (raise "
                  "data.cache_rows and delete the folder for fresh ones)", file=sys.stderr)
        if meta["d_in"] != self.d_in:
            raise _damaged(self.directory / METADATA, f"records d_in={meta['d_in']}, but the "
                           f"model's activations at this hook have width {self.d_in}")
        self.shards = [open_shard(self.directory, s, self.d_in, meta["dtype"])
                       for s in meta["shards"]]
        self.meta = meta

    @property
    def n_rows(self) -> int:
        return sum(len(s) for s in self.shards)

    def eval_rows(self, n_rows: int) -> Tensor:
        return self.lm.eval_rows(n_rows)

    def eval_documents(self, n_rows: int) -> Tensor:
        return self.lm.eval_documents(n_rows)

    def describe(self) -> dict:
        stored = (self.meta or {}).get("dtype", "float32")
        return {**self.lm.describe(), "cache": str(self.directory), "cache_rows": self.n_rows,
                **({"cache_dtype": stored} if stored != "float32" else {})}

    def fingerprint(self) -> dict:
        """What a resume checks the cache against (gsae_pl/run/inputs.py)."""
        meta = self.meta or {}
        return {"cache": str(self.directory), "rows": meta.get("rows"), "d_in": self.d_in,
                "dtype": meta.get("dtype"), "blake2b": cache_digest(meta) if meta else None}

    def global_batches(self, batch_size: int, start_step: int) -> Iterator[Tensor]:
        if self.meta is None:
            raise RuntimeError("CachedSource.prepare() first: the cache is not open")
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise UserError(f"the cache in {self.directory} has {self.n_rows} rows, fewer than "
                            f"one batch of {batch_size}: raise data.cache_rows")

        def batches_of(epoch: int, first: int) -> Iterator[Tensor]:
            reader = _RowReader(self._epoch_rows(epoch, first * batch_size))
            return (reader.take(batch_size) for _ in range(first, per_epoch))

        return epoch_batches(per_epoch, start_step, batches_of)

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


@SOURCES.register("tiny_lm")
@SOURCES.register("transformer_lens")
def build(cfg):
    """The LM source (data/transformer_lens.py), or with data.cache=true the disk cache of its
    activations (written by the DataModule's prepare_data)."""
    from gsae_pl.data.transformer_lens import build_lm_source  # here: torch-heavy, at use

    check_cache_dir(cfg)  # before the LM loads and runs
    lm = build_lm_source(cfg)
    return CachedSource(lm, cfg) if cfg.data.cache else lm
