"""What every entry point shares: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gsae_pl.errors import UserError


def run_main(job: Callable[[], int]) -> int:
    try:
        return job()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UserError` (one line, exit 2) like any bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see python -m {self.prog.split()[-1]} --help)")
