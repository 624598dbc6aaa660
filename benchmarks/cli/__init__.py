"""What a user calls: the command line (`main` parses, `commands` does), the Python API behind
`import fsbench` (`api`), and `qualitative` (episodes re-predicted from a checkpoint)."""

from fsbench.benchmarks.cli.main import main

__all__ = ["main"]
