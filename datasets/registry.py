"""The dataset registry, typed by `FewShotDataset`. The registry machinery and the error type live
in fsbench.core; they are re-exported here for plugins written against earlier versions."""

from __future__ import annotations

from fsbench.core import (  # noqa: F401  (re-exported)
    PLUGIN_GROUP,
    FsbenchError,
    Registry,
    import_plugins,
    load_entry_points,
)
from fsbench.datasets.base import FewShotDataset

# Every module of fsbench.datasets registers its own datasets (a new one is one new file).
DATASETS = Registry("dataset", packages=("fsbench.datasets",), base=FewShotDataset)


def dataset_class(dataset) -> type[FewShotDataset]:
    """The class of a dataset given by registry name, object or class, known without opening
    it; `FewShotDataset` (no replay, presets unchanged) when a plugin's builder declares none."""
    if isinstance(dataset, str):
        dataset = DATASETS.provides(dataset)
    elif dataset is not None and not isinstance(dataset, type):
        dataset = type(dataset)
    if dataset is None or not issubclass(dataset, FewShotDataset):
        return FewShotDataset
    return dataset


def open_dataset(dataset_cfg: dict, protocol="panet") -> FewShotDataset:
    """The dataset of a grid's `dataset:` section; the protocol sets its defaults (COCO fold
    convention, crowds)."""
    kwargs = {k: v for k, v in dataset_cfg.items() if k != "name"}
    return DATASETS.build(dataset_cfg["name"], protocol=protocol, **kwargs)
