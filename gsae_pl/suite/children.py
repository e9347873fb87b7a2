"""Child processes that do not outlive the command that started them.

An `ablate` killed by SIGKILL (OOM killer, `scancel`, a user) cannot stop its `fit`
children itself; left alone they train on with parent 1, and a rerun would start a second
trainer on the same run. On Linux each child asks the kernel for SIGTERM when its parent
dies (prctl PR_SET_PDEATHSIG), which fit answers like any SIGTERM: Lightning stops at the
next batch and forwards it to its own DDP processes. Elsewhere there is no such call; the
run lock (gsae_pl/run/lock.py) still keeps a second trainer out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE_S = 30.0  # a stopped fit ends at its next batch; SIGKILL after this long


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: between fork and exec the child should only make the call.
_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: the child gets SIGTERM when this process dies."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody will tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop(processes: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process still running, wait up to `grace` seconds in all, then SIGKILL.

    SIGTERM first, not SIGKILL: fit forwards it to its DDP processes, which a SIGKILL of
    fit alone would leave running."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
