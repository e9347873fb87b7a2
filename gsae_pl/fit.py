"""`python -m gsae_pl.fit`: see gsae_pl/run/train.py. The arguments parse first
(gsae_pl/run/fit_args.py), so `--help` answers before torch and Lightning load."""

import sys

from gsae_pl.cli import run_main
from gsae_pl.run.fit_args import parse_args


def main(argv: list[str] | None = None) -> int:
    def job() -> int:
        args = parse_args(argv)
        from gsae_pl.run.train import run_command  # the training stack: seconds to import

        return run_command(args)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
