"""gsae_pl.allocator: large tensors come from the reusable heap, unless the user said not to."""

import ctypes
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: glibc's settings are per process and read by torch at start.
PROBE = """
import ctypes, gsae_pl, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = torch.empty(4096, 4096)  # 64 MiB: over glibc's largest mmap threshold
print(libc.mallinfo2().hblkhd >> 20)  # MiB held in mmapped blocks
"""


def _mmapped_mib(**env) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return int(result.stdout.strip())


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33")
def test_large_tensors_come_from_the_heap_and_the_environment_wins():
    assert _mmapped_mib() == 0  # served from the heap, where the next step reuses it
    # A user's own glibc setting switches gsae_pl's off: the block is mmapped as usual.
    assert _mmapped_mib(GLIBC_TUNABLES="glibc.malloc.perturb=0") >= 64
