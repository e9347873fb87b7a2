"""`python -m gsae_pl.fit`: see gsae_pl/run/train.py."""

import sys

from gsae_pl.run.train import main

if __name__ == "__main__":
    sys.exit(main())
