"""Benchmark of LM activation production and the disk cache (issue 3), on the tiny LM.

    .venv/bin/python benchmarks/lm_activations.py [--windows 512] [--cache-rows 1048576]

Measures, each in its own phase:
  1. tokens/s of activation production at data.hook: the forward pass stopped at the hook
     (what gsae_pl does) against a full forward that captures the same activation;
  2. peak resident memory while streaming training batches through the default shuffle
     buffer (data.buffer_size), in a fresh process so earlier phases do not count;
  3. cache write (end to end, LM included, and the disk part alone) and cache read
     throughput through CachedSource.global_batches (page cache warm: the shards were just
     written, which is the common case of a cache read right after it is made).
Prints one JSON object; benchmarks/RESULTS.md records the figures with the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsae_pl.config import load_config  # noqa: E402
from gsae_pl.data.transformer_lens import build_lm_source  # noqa: E402


def _cfg(*overrides: str):
    return load_config(ROOT / "configs/base.yaml", ["data.source=tiny_lm", *overrides])


def production(source, windows: int, repeats: int = 3) -> dict:
    """Best-of-`repeats` tokens/s, stopped at the hook vs a full forward."""
    tokens = source.heldout_tokens(len(source.heldout))
    while len(tokens) < windows:
        tokens = torch.cat([tokens, tokens])
    tokens = tokens[:windows]
    batches = tokens.split(source.lm_batch_size)

    def full(batch):
        captured = []
        source.bridge.run_with_hooks(batch, fwd_hooks=[(source.hook, lambda a, hook:
                                                        captured.append(a))])
        return captured[0]

    out = {}
    for name, run in (("stop_at_hook", source.activations), ("full_forward", full)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    run(batch)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_tokens_per_s"] = round(tokens.numel() / best)
    out["speedup"] = round(out["stop_at_hook_tokens_per_s"] / out["full_forward_tokens_per_s"], 2)
    return out


def peak_memory(batches: int) -> dict:
    """Run in a child: RSS after loading vs peak while streaming through the buffer."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import resource, itertools;"
            "from benchmarks.lm_activations import _cfg; "
            "from gsae_pl.data.base import train_stream; "
            "from gsae_pl.data.transformer_lens import build_lm_source; "
            "s = build_lm_source(_cfg()); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"n = sum(1 for _ in itertools.islice(train_stream(s, 1024), {batches})); "
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "print(before, after, s.buffer_size, s.d_in)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    before, after, buffer_rows, d_in = (int(v) for v in out[-4:])
    return {"rss_after_load_mb": round(before / 1024), "peak_rss_streaming_mb": round(after / 1024),
            "buffer_rows": buffer_rows, "buffer_mb_float32": round(buffer_rows * d_in * 4 / 2**20),
            "batches_streamed": batches}


def cache_throughput(rows: int) -> dict:
    from gsae_pl.data.cache import CachedSource, write_cache
    from gsae_pl.io import atomic_save_npy

    cfg = _cfg(f"data.cache_rows={rows}")
    lm = build_lm_source(cfg)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        start = time.perf_counter()
        meta = write_cache(lm, Path(tmp) / "acts", cfg, progress=False)
        write_s = time.perf_counter() - start
        gb = meta["rows"] * meta["d_in"] * 4 / 1e9
        block = torch.randn(65536, meta["d_in"]).numpy()
        start = time.perf_counter()
        for i in range(8):
            atomic_save_npy(Path(tmp) / f"disk_{i}.npy", block)
        disk_gbs = 8 * block.nbytes / 1e9 / (time.perf_counter() - start)
        source = CachedSource(lm, cfg, directory=Path(tmp) / "acts")
        source.prepare()
        n_batches = meta["rows"] // 4096
        start = time.perf_counter()
        for _ in zip(range(n_batches), source.global_batches(4096, 0)):
            pass
        read_s = time.perf_counter() - start
    return {"cache_rows": meta["rows"], "cache_gb": round(gb, 3),
            "write_end_to_end_rows_per_s": round(meta["rows"] / write_s),
            "write_end_to_end_gb_per_s": round(gb / write_s, 3),
            "write_disk_only_gb_per_s": round(disk_gbs, 2),
            "read_gb_per_s": round(n_batches * 4096 * meta["d_in"] * 4 / 1e9 / read_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=512)
    parser.add_argument("--cache-rows", type=int, default=1 << 20)
    parser.add_argument("--stream-batches", type=int, default=300)
    args = parser.parse_args()
    source = build_lm_source(_cfg())
    result = {"torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
              "hook": source.hook, "d_in": source.d_in, "context_size": source.heldout.shape[1],
              "lm_batch_size": source.lm_batch_size}
    result.update(production(source, args.windows))
    result.update(peak_memory(args.stream_batches))
    result.update(cache_throughput(args.cache_rows))
    result["load_avg_end"] = os.getloadavg()
    result["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
