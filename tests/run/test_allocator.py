"""gsae_pl.allocator: under a gsae_pl command large tensors come from the reusable heap;
importing gsae_pl as a library, or a user's own glibc setting, leaves glibc alone."""

import ctypes
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: glibc's settings are per process.
PROBE = """
import ctypes, gsae_pl, torch
from gsae_pl.cli import run_main

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mmapped_mib = lambda: libc.mallinfo2().hblkhd >> 20

def mmapped_by_a_block():
    before = mmapped_mib()
    block = torch.empty(4096, 4096)  # 64 MiB: over glibc's largest mmap threshold
    return mmapped_mib() - before

imported = mmapped_by_a_block()
run_main(lambda: 0)  # what every command (fit, ablate, cache, ...) starts with
print(imported, mmapped_by_a_block())
"""


def _mmapped_mib(**env) -> tuple[int, int]:
    """MiB of mmapped blocks that one 64 MiB tensor adds: after `import gsae_pl`, and
    after an entry point has started."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    imported, command = result.stdout.split()
    return int(imported), int(command)


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33")
def test_commands_take_large_tensors_from_the_heap_and_the_environment_wins():
    imported, command = _mmapped_mib()
    assert imported >= 64  # a library import changes nothing: the block is mmapped
    assert command == 0  # a command's blocks come from the heap, reused step to step
    # A user's own glibc setting switches gsae_pl's off.
    assert _mmapped_mib(GLIBC_TUNABLES="glibc.malloc.perturb=0")[1] >= 64
