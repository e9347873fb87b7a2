"""fit's command line, parsed before the training stack loads: `--help` and a usage error
answer in a fraction of a second, where importing torch and Lightning takes seconds
(gsae_pl/fit.py imports gsae_pl/run/train.py only once the arguments parse)."""

from __future__ import annotations

import argparse

from gsae_pl.cli import ArgumentParser, add_config_arguments, parse_config_arguments

DESCRIPTION = """Train one SAE into <output.dir>/<output.name>/ (config.yaml, TensorBoard events,
checkpoints/, provenance.json, and metrics.json last: its presence means the run finished).

Rerunning the same command resumes from the newest checkpoint, or says the run is finished.
A run folder that holds a run with a different config is refused (exit 2), naming the keys
that differ: pick another output.name (one is suggested), or pass --force to replace it."""

FORCE_HELP = ("replace the run in the run directory: once the new config, data and trainer "
              "settings pass their checks, the old run's metrics.json goes first (so an "
              "interrupted --force never leaves a folder that reads as finished), then its "
              "checkpoints, events, config and provenance; then training starts from step 0. "
              "Your own files in the folder stay. The old run's results are lost: to keep "
              "them, set output.name instead")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.fit", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    return parse_config_arguments(parser, argv)
