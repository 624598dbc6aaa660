"""fsbench: a distributed, reproducible benchmark harness for few-shot semantic segmentation.

    import fsbench
    frame = fsbench.run("quickstart.yaml", ["shots=[1]"], serial=True)

The code lives in the repository's methods/, datasets/ and benchmarks/ folders, installed as
fsbench.methods, fsbench.datasets and fsbench.benchmarks.
"""

from fsbench.benchmarks.api import RunOptions, register_dataset, register_method, run
from fsbench.core import FsbenchError

__all__ = ["FsbenchError", "RunOptions", "register_dataset", "register_method", "run"]
