"""Shared fixtures: a small generated dataset in the real VOC2012 + SBD-aug layout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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

# The quick tier (`pytest -m quick`, the contributor's minute): every test is marked `quick`
# unless it uses one of these fixtures (they start a Ray cluster, an MLflow server or CLI
# processes, or generate a large data set) or is marked `slow` itself (it runs a whole grid, a
# local Ray instance or a full-size network). Plain `pytest` runs both tiers.
SLOW_FIXTURES = {
    "ray_cluster",  # a head and a worker node (test_ray_cluster.py)
    "mlflow_server",  # a real `mlflow server`
    "cli_process",  # the CLI in a subprocess, as a user's shell runs it
    "recorded_voc",  # the 900-image layouts the official episodes were recorded on
    "recorded_coco",
    "coco_root",  # a 600-image generated COCO layout
}
# The guard: in a `-m quick` session, a quick test whose setup, call and teardown use more CPU
# time than this (this process, all its threads) fails the session, naming the test (mark it
# slow, or use a smaller fixture). CPU time, not wall time: a loaded machine slows every test's
# wall clock but not the work it does, so the guard never fails for the machine's load.
QUICK_LIMIT_CPU_SECONDS = 4.0


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
    return _small_grid(voc_root)


def _small_grid(voc_root) -> dict:
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


@pytest.fixture
def quick_grid(tmp_path, small_grid_dict):
    """The tiny grid without training: one untrained method, one seed (seconds per run)."""
    import yaml

    grid = dict(small_grid_dict, seeds=[1], methods=["all_background", "test_prototype_notrain"])
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump({**grid, "name": "quick"}))
    return path


@pytest.fixture(scope="session")
def _quick_results_once(tmp_path_factory, voc_root):
    """The quick grid run once per session (serial, no tracking, report written)."""
    import yaml

    from fsbench.benchmarks.cli.main import main

    folder = tmp_path_factory.mktemp("quick-once")
    grid = _small_grid(voc_root)
    grid.update(name="quick", seeds=[1], methods=["all_background", "test_prototype_notrain"])
    path = folder / "quick.yaml"
    path.write_text(yaml.safe_dump(grid))
    code = main(["run", str(path), "--serial", "--no-tracking", "--results", str(folder / "r")])
    assert code == 0
    return folder / "r"


@pytest.fixture
def quick_results(tmp_path, _quick_results_once):
    """A private copy of a finished quick-grid results folder at `tmp_path / "r"` (cells,
    manifests, report): what `fsbench run quick.yaml --serial --no-tracking` leaves, in a
    fraction of the time."""
    import shutil

    results = tmp_path / "r"
    shutil.copytree(_quick_results_once, results, symlinks=True)
    return results


@pytest.fixture
def cli_process():
    """Runs `fsbench ARGS` in a fresh process (as a user's shell does): returns a function of
    (args, cwd=None, env=None, timeout=…) giving the CompletedProcess."""

    def run(args, cwd=None, env=None, timeout=600):
        return subprocess.run(
            [sys.executable, "-m", "fsbench.benchmarks.cli", *map(str, args)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def _is_slow(item) -> bool:
    return "slow" in item.keywords or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))


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
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        elif "gpu" not in item.keywords:
            item.add_marker(pytest.mark.quick)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


_QUICK_TIMES: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    started = time.process_time()
    yield
    if "quick" in item.keywords:
        _QUICK_TIMES[item.nodeid] = time.process_time() - started


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FSBENCH_QUICK_TIMES"):  # where the CPU goes, for whoever tunes the tier
        ranked = sorted(_QUICK_TIMES.items(), key=lambda kv: -kv[1])[:15]
        Path(os.environ["FSBENCH_QUICK_TIMES"]).write_text(
            "".join(f"{seconds:.2f} {nodeid}\n" for nodeid, seconds in ranked)
        )
    if "quick" not in (session.config.getoption("markexpr") or ""):
        return
    over = {k: v for k, v in _QUICK_TIMES.items() if v > QUICK_LIMIT_CPU_SECONDS}
    if over:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for nodeid, seconds in sorted(over.items(), key=lambda kv: -kv[1]):
            reporter.write_line(
                f"quick tier guard: {nodeid} used {seconds:.1f} s of CPU (limit "
                f"{QUICK_LIMIT_CPU_SECONDS:.0f} s): mark it slow or give it a smaller fixture",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
