"""Does feeding the step from disk slow it down? The same gated step fed three ways.

    python benchmarks/data_path.py            # gated 512 x 4096, batch 4096

memory: one fixed in-memory batch (no data work at all);
file:   `data.source=file` over a memory-mapped .npy written here, reshuffled per epoch
        (random rows gathered in sorted order each batch), as `fit` reads it;
cache:  contiguous slices of memory-mapped .npy shards, the way the activation cache
        (data/cache.py) reads, emulated here on shards this script writes.
Reported: median ms/step of each and the slowdown against memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from step import batch_loader, make_module, time_steps

from gsae_pl import allocator
from gsae_pl.data.file import FileSource

ROOT = Path(__file__).resolve().parents[1]


def shard_stream(shards: list[np.ndarray], batch: int):
    """Contiguous batches from memory-mapped shards in turn, as float32 tensors."""
    while True:
        for shard in shards:
            for start in range(0, len(shard) - batch + 1, batch):
                yield torch.from_numpy(np.ascontiguousarray(shard[start:start + batch],
                                                            dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/data_path.json"))
    args = parser.parse_args()
    allocator.configure()  # as every gsae_pl command does (gsae_pl/allocator.py)
    rows = args.batch * (args.steps + args.warmup + 2)  # one epoch covers every round
    torch.manual_seed(0)
    data = torch.randn(rows + 4096, args.d_in)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.npy"
        np.save(path, data.numpy())
        shards = []
        for i, chunk in enumerate(data[:rows].split(rows // 4)):
            np.save(Path(tmp) / f"shard{i}.npy", chunk.numpy())
            shards.append(np.load(Path(tmp) / f"shard{i}.npy", mmap_mode="r"))
        file_source = FileSource(str(path), seed=0, holdout_rows=4096, min_train_rows=args.batch)
        feeds = {
            "memory": batch_loader(lambda: itertools.repeat(data[:args.batch])),
            "file": batch_loader(lambda: file_source.global_batches(args.batch, 0)),
            "cache": batch_loader(lambda: shard_stream(shards, args.batch)),
        }
        times = {name: [] for name in feeds}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all alike
            for name, loader in feeds.items():
                module = make_module("gated", args.d_in, args.d_sae, "dense", args.batch,
                                     data[:args.batch])
                times[name] += time_steps(module, loader, args.steps, args.warmup).times[
                    args.warmup:]
        for name in feeds:
            results[name] = statistics.median(times[name]) * 1e3
            print(f"{name:<8}{results[name]:>10.1f} ms/step  "
                  f"{results[name] / results['memory'] - 1:+.1%} vs memory", flush=True)
    Path(args.out).write_text(json.dumps({"ms_per_step": results, "args": vars(args)},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
