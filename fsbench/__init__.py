"""fsbench: a distributed, reproducible benchmark harness for few-shot semantic segmentation.

    import fsbench
    frame = fsbench.run("quickstart.yaml", ["shots=[1]"], serial=True)

Extension points: `register_method` (a `FewShotMethod` builder, with its display name and former
names), `register_dataset` (a `FewShotDataset` builder), `register_metric` (a function of summed
counts), `register_evaluator` (an `Evaluator` fed every batch, named in a grid's `evaluators:`);
`fsbench.testing.check_method` is the conformance kit a new method should pass. The code lives in
the repository's methods/, datasets/ and benchmarks/ folders, installed as fsbench.methods,
fsbench.datasets and fsbench.benchmarks; ARCHITECTURE.md says how they fit.
"""

from fsbench.benchmarks.cli.api import (
    RunOptions,
    register_dataset,
    register_evaluator,
    register_method,
    run,
)
from fsbench.benchmarks.metrics import Metric, register_metric
from fsbench.core import FsbenchError
from fsbench.datasets.base import FewShotDataset

__all__ = [
    "FewShotDataset",
    "FewShotMethod",
    "FsbenchError",
    "Metric",
    "RunOptions",
    "register_dataset",
    "register_evaluator",
    "register_method",
    "register_metric",
    "run",
]


def __getattr__(name: str):
    # `fsbench.FewShotMethod` on first use: importing fsbench (e.g. for the report, or on a
    # machine that only reads results) does not import torch.
    if name == "FewShotMethod":
        from fsbench.methods.layers import FewShotMethod

        return FewShotMethod
    raise AttributeError(f"module 'fsbench' has no attribute {name!r}")
