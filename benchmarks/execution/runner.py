"""Runs a grid: a plan (planning.py) → jobs on an executor (executors.py: serial or Ray) → the
driver (driver.py) writes results and logs them to MLflow."""

from __future__ import annotations

from fsbench.benchmarks.execution.driver import Driver
from fsbench.benchmarks.execution.executors import RayExecutor, SerialExecutor  # noqa: F401 (re-exported)
from fsbench.benchmarks.execution.planning import plan_grid
from fsbench.benchmarks.grid.files import GridSpec
from fsbench.benchmarks.store.results import ResultStore

__all__ = ["Driver", "RayExecutor", "SerialExecutor", "plan_grid", "run_grid"]


def run_grid(
    grid: GridSpec, store: ResultStore, executor, tracker=None, rerun=False, progress=True
) -> Driver:
    """Plan, execute and record a grid; returns the driver (written and failed cells)."""
    plan = plan_grid(grid, store, rerun)
    store.write_plan(plan.cells, grid.compare, grid.seed_summary)
    driver = Driver(grid, store, plan, tracker, progress)
    if tracker is not None:
        tracker.start_invocation(grid, plan, store)
    status = "KILLED"  # unless the executor returns: Ctrl-C, a lost cluster, a bug
    try:
        if plan.jobs:
            executor.run(plan.jobs, driver)
        status = "FAILED" if driver.failed else "FINISHED"
    finally:
        driver.close()
        if tracker is not None:
            tracker.finish_invocation(status)
    return driver
