"""Allow ``python -m mnseg`` (and ``torchrun -m mnseg``)."""

import sys

from mnseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
