"""Thin shim: `python run_benchmark.py [command ...]` is the `fsbench` console script."""

import sys

if __name__ == "__main__":
    from fsbench.benchmarks.cli import main

    sys.exit(main())
