"""`python -m meft_fx inspect PATH_OR_NAME ...` (see `meft_fx.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
