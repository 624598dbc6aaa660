"""`python -m fsbench.benchmarks.cli …` is the `fsbench` command."""

import sys

from fsbench.benchmarks.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
