"""`python -m gsae_pl.report`: see gsae_pl/suite/report.py."""

import sys

from gsae_pl.suite.report import main

if __name__ == "__main__":
    sys.exit(main())
