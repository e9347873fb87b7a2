"""What every entry point shares: bad input is one line on stderr and exit code 2;
a run that fails part-way (`RunFailed`) is one line and exit code 3, or 128 + the signal
for one a signal stopped (`preemption.Preempted`: 143 for SIGTERM); the CPU allocator set
up for training (gsae_pl/allocator.py)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from gsae_pl import allocator
from gsae_pl.errors import RunFailed, UserError


def run_main(job: Callable[[], int]) -> int:
    # Here, not at import: a library user's process (say, a notebook calling load_sae)
    # keeps its allocator; a command sets it before its first large tensor.
    allocator.configure()
    try:
        return job()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        # Under DDP every process stops with the same message; the extra ranks say who they are.
        local_rank = os.environ.get("LOCAL_RANK", "0")
        prefix = f"local process {local_rank}: " if local_rank != "0" else ""
        print(f"{prefix}error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 3)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UserError` (one line, exit 2) like any bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see python -m {self.prog.split()[-1]} --help)")
