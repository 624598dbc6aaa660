"""Shared fixtures: a small generated dataset in the real VOC2012 + SBD-aug layout."""

from __future__ import annotations

import os

import pytest

# The suite's small method variants (tests/small_methods.py) are a plugin: every process the tests
# start (CLI subprocesses, Ray workers) inherits these two variables and registers them too.
TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["FSBENCH_PLUGINS"] = "small_methods"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

from fsbench.datasets.pascal import Pascal5i  # noqa: E402
from fsbench.datasets.synthetic import write_voc  # noqa: E402

TEST_IMAGES = 200
TEST_SIZE = 64


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Generated data and class indexes never touch the user's cache during tests.
    monkeypatch.setenv("FSBENCH_DATA", str(tmp_path_factory.getbasetemp() / "fsbench-cache"))


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, TEST_IMAGES, TEST_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def dataset(voc_root, tmp_path_factory):
    return Pascal5i(voc_root, cache_dir=tmp_path_factory.mktemp("index"))


@pytest.fixture
def small_grid_dict(voc_root):
    """A tiny grid on the session dataset, for runner/CLI tests."""
    return {
        "name": "tiny",
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "protocol": "panet",
        "input_size": 32,
        "episodes": 6,
        "seeds": [1, 2],
        "folds": [0],
        "shots": [1],
        "methods": [{"name": "test_panet"}, {"name": "test_prototype_notrain"}, "all_background"],
        "train": {"steps": 4, "lr_milestones": [3], "log_every": 2},
    }


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
