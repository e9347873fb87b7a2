"""`python -m gsae_pl.ablate`: see gsae_pl/suite/launcher.py."""

import sys

from gsae_pl.suite.launcher import main

if __name__ == "__main__":
    sys.exit(main())
