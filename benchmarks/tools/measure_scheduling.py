"""Scheduling and logging overhead per cell, and the speed-up of 2 Ray workers over 1.

    python -m fsbench.benchmarks.tools.measure_scheduling [--cells 8] [--steps 150]
    python -m fsbench.benchmarks.tools.measure_scheduling --tracking-cells 200  # MLflow cost

Runs a grid of equal cells (narrow PANet on generated data, one fold each) three ways: in-process
(serial), local Ray with 1 worker and with 2 workers, each logging to its own MLflow sqlite store.
Prints wall times, the driver's recording time (results + MLflow), and the overhead per cell as a
share of the cell's compute time. Figures only: no assertion on speed (tests check behaviour).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fsbench.benchmarks.execution.runner import RayExecutor, SerialExecutor, run_grid
from fsbench.benchmarks.grid.files import parse_grid
from fsbench.benchmarks.store.results import ResultStore
from fsbench.benchmarks.tracking.tracker import Tracker, default_tracking_uri


def alpha_sweep_grid(name: str, method: str, alphas, episodes: int, train=None) -> dict:
    """Cells of equal cost: one narrow PANet variant per α (an ablation axis) on each fold."""
    grid = {
        "name": name,
        "dataset": {"name": "synthetic_pascal5i", "n_images": 600, "image_size": 128},
        "input_size": 64,
        "episodes": episodes,
        "seeds": [1234],
        "folds": [0, 1, 2, 3],
        "shots": [1],
        "methods": [{"name": method, "kwargs": {"width": 0.125}, "sweep": {"alpha": alphas}}],
    }
    return {**grid, "train": train} if train else grid


def equal_cells_grid(cells: int, steps: int) -> dict:
    alphas = [10.0 * (i + 1) for i in range(max(1, cells // 4))]
    train = {"steps": steps, "lr_milestones": [steps], "log_every": 10}
    return alpha_sweep_grid("equal_cells", "panet", alphas, 100, train)


def eval_only_grid(cells: int) -> dict:
    """An α sweep of untrained PANet: `cells` evaluation-only cells of a second or less each."""
    alphas = [1.0 + i for i in range(max(1, cells // 4))]
    return alpha_sweep_grid("alpha_sweep", "prototype_notrain", alphas, 20)


def measure(executor, grid, root: Path, tracking: bool = True) -> dict:
    store = ResultStore(root, grid.name)
    tracker = None
    if tracking:  # as `run` logs: from a logging thread
        tracker = Tracker(default_tracking_uri(root), root, grid.name, asynchronous=True)
    started = time.perf_counter()
    driver = run_grid(grid, store, executor, tracker, rerun=True, progress=False)
    wall = time.perf_counter() - started
    executor.stop()
    n = len(driver.written)
    return {
        "wall": wall,
        "cells": n,
        "task": driver.task_seconds,
        "record": driver.record_seconds,
        "failed": len(driver.failed),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8, help="equal cells (multiple of 4)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per cell")
    parser.add_argument(
        "--tracking-cells",
        type=int,
        default=0,
        help="instead: an evaluation-only grid of this many cells on 2 Ray workers, with MLflow "
        "and with --no-tracking (the driver's time per cell)",
    )
    args = parser.parse_args(argv)
    if args.tracking_cells:
        return tracking_overhead(args.tracking_cells)
    grid = parse_grid(equal_cells_grid(args.cells, args.steps))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        runs = {
            "serial (in-process)": measure(SerialExecutor(), grid, root / "serial"),
            "ray, 1 worker": measure(RayExecutor(num_cpus=1).start(), grid, root / "ray1"),
            "ray, 2 workers": measure(RayExecutor(num_cpus=2).start(), grid, root / "ray2"),
        }
    print(f"{len(grid.expand())} equal cells (narrow PANet, {args.steps} steps, 100 episodes)")
    print(
        f"{'run':<22}{'wall s':>9}{'compute s':>11}{'record s':>10}{'overhead/cell s':>17}"
        f"{'share':>8}"
    )
    for name, run in runs.items():
        workers = 2 if "2 workers" in name else 1
        overhead = (run["wall"] * workers - run["task"]) / max(run["cells"], 1)
        share = overhead / (run["task"] / max(run["cells"], 1))
        print(
            f"{name:<22}{run['wall']:>9.1f}{run['task']:>11.1f}{run['record']:>10.2f}"
            f"{overhead:>17.2f}{share:>8.1%}"
        )
    speedup = runs["ray, 1 worker"]["wall"] / runs["ray, 2 workers"]["wall"]
    print(f"speed-up of 2 workers over 1: {speedup:.2f}x (ideal 2.00x on 2 cores)")
    print(
        "overhead/cell = (wall × workers − task compute) / cells; 'record' = driver time writing "
        "results JSON + MLflow child runs"
    )


def tracking_overhead(cells: int) -> None:
    grid = parse_grid(eval_only_grid(cells))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        runs = {
            name: measure(RayExecutor(num_cpus=2).start(), grid, root / name, tracking)
            for name, tracking in (("no tracking", False), ("MLflow (sqlite)", True))
        }
    print(f"{len(grid.expand())} evaluation-only cells on local Ray (2 workers)")
    print(f"{'run':<18}{'wall s':>9}{'compute s':>11}{'driver ms/cell':>16}")
    for name, run in runs.items():
        per_cell = 1000 * run["record"] / max(run["cells"], 1)
        print(f"{name:<18}{run['wall']:>9.1f}{run['task']:>11.1f}{per_cell:>16.1f}")
    extra = runs["MLflow (sqlite)"]["wall"] - runs["no tracking"]["wall"]
    print(
        f"MLflow adds {extra:.1f} s of wall time in all ({1000 * extra / cells:.0f} ms per cell); "
        "driver ms/cell = the driver's time writing the cell file and handing it to the logger"
    )


if __name__ == "__main__":
    main()
