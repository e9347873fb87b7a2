"""CPU memory allocator settings, applied by every gsae_pl command (`cli.run_main`) and
benchmark at its start; importing gsae_pl as a library changes nothing.

A training step allocates and frees several [batch, d_sae] tensors (64 MiB each at
4096 x 4096). glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free,
so each step pays the page faults, and the kernel's zeroing, of every such tensor again:
~15% of the gated step at 512 x 4096 on the 2-core CI machine (benchmarks/RESULTS.md).
Two settings remove that:
- `M_MMAP_MAX = 0`: large blocks come from the heap instead, and freed ones are reused
  by the next step without faults (glibc still falls back to mmap where the heap cannot
  grow, e.g. beyond a thread arena's 64 MiB).
- `M_TRIM_THRESHOLD = -1`: free memory at the top of the heap is kept, never handed back.
The cost: the process keeps its peak memory until it exits, a few hundred MiB above
glibc's own peak at 768 x 16384, and level after the first tens of steps
(benchmarks/memory.py).
A glibc setting already in the environment (MALLOC_*_ or GLIBC_TUNABLES) wins; on a C
library other than glibc nothing is changed. (Torch's transparent huge pages,
THP_MEM_ALLOC_ENABLE, which gsae_pl used to set, made no measurable difference on top of
this: benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
NEVER_TRIM = -1
_GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def configure() -> bool:
    """Apply the settings above; True if glibc's were changed."""
    if any(name in os.environ for name in _GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
