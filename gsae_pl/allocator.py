"""CPU memory allocator settings, applied once when gsae_pl is imported.

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
Transparent huge pages (THP_MEM_ALLOC_ENABLE, read by torch at its first large allocation)
make the first touch of each block cheaper still. Any of these already set in the
environment wins; on a C library other than glibc nothing is changed.
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
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if any(name in os.environ for name in _GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
