"""What every entry point shares: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gsae_pl.errors import UserError


def run_main(job: Callable[[], int]) -> int:
    try:
        return job()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
