"""``python -m sdkernels.train``: see :mod:`sdkernels.train.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
