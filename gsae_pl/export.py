"""`python -m gsae_pl.export RUN_DIR OUT_DIR`: a run in SAELens's format (gsae_pl/saelens.py)."""

import sys

from gsae_pl.saelens import main

if __name__ == "__main__":
    sys.exit(main())
