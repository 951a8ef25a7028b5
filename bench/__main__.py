"""``python -m bench``: the pipeline measured against this machine's own ceilings (bench.cli
says what it runs, in which order; bench.stack, bench.phases and bench.report do it)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
