"""`python -m ldm ...`: the same as the `ldm` console script (ldm/cli.py)."""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main())
