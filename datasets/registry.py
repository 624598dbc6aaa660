"""The dataset registry. The registry machinery and the error type live in fsbench.core; they
are re-exported here for plugins written against earlier versions."""

from __future__ import annotations

from fsbench.core import (  # noqa: F401  (re-exported)
    PLUGIN_GROUP,
    FsbenchError,
    Registry,
    import_plugins,
    load_entry_points,
)

DATASETS = Registry(
    "dataset",
    builtins=(
        "fsbench.datasets.pascal",
        "fsbench.datasets.coco",
        "fsbench.datasets.generated",
        "fsbench.datasets.fss",
    ),
)
