"""Cluster scale, by simulation: grids of hundreds to thousands of cells on a multi-node Ray
cluster with declared GPUs, all on 127.0.0.1.

    python -m fsbench.benchmarks.tools.scale [--nodes 8] [--gpus-per-node 8] [--cells 100 500 2000]
        [--eval-gpus 0.25] [--step-seconds 1.0] [--image-seconds 0.05]
        [--tracking none sqlite server postgres]
        [--kill-node] [--kill-driver] [--out DIR]

Starts a real cluster (`ray start`: a head with no task slots and `--nodes` nodes of
`--gpus-per-node` declared GPUs each, token-authenticated), and runs grids of the stand-in method
(tools/standin.py: seeded sleeps per training step and per encoded image) through fsbench's real
driver, planning, manifests, result store and MLflow (an sqlite store, or a real `mlflow server`),
each size in its own driver process. Prints per size: makespan against the ideal (GPU-seconds of
the tasks / GPUs), simulated-GPU utilisation, driver CPU and MLflow time per cell, cells per second
at saturation, peak driver RSS, encodings per distinct image, lost and duplicated cells, and how
long `sync`, the report and a runs search take; plots makespan and overhead against grid size.
`--kill-node` kills one node's raylet halfway through the largest grid; `--kill-driver` kills the
driver halfway and restarts it. Each worker process imports torch (~0.3 GB): size the cluster to
the machine's memory (concurrent tasks ≈ GPUs / eval_gpus). Figures only, no assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fsbench.benchmarks.execution.executors import RayExecutor
from fsbench.benchmarks.execution.runner import run_grid
from fsbench.benchmarks.grid.files import parse_grid
from fsbench.benchmarks.report import build_report
from fsbench.benchmarks.store.records import read_cells
from fsbench.benchmarks.store.results import ResultStore
from fsbench.benchmarks.tools.cluster import LocalCluster, LocalPostgres, MlflowServer
from fsbench.benchmarks.tools.scale_report import _row, _table, plot
from fsbench.benchmarks.tracking.tracker import CELL_TAG, Tracker
from fsbench.datasets.registry import open_dataset

STANDIN = "fsbench.benchmarks.tools.standin"


def scale_grid(name: str, cells: int, args) -> dict:
    """`cells` cells of the stand-in (a sweep of variants × 4 folds × 1/5-shot), each its own
    trained model, on a small generated dataset; GPU-shaped requests as grid values."""
    variants = max(1, cells // 8)
    return {
        "name": name,
        "imports": [STANDIN],
        "dataset": {"name": "synthetic_pascal5i", "n_images": 200, "image_size": 48},
        "protocol": "panet",
        "input_size": 32,
        "episodes": args.episodes,
        "seeds": [1234],
        "folds": [0, 1, 2, 3],
        "shots": [1, 5],
        "methods": [
            {
                "name": "standin",
                "kwargs": {
                    "step_seconds": args.step_seconds,
                    "image_seconds": args.image_seconds,
                },
                "sweep": {"variant": list(range(variants))},
            }
        ],
        "train": {"steps": args.steps, "lr_milestones": [args.steps], "log_every": args.steps},
        "train_workers": 0,
        "checkpoint_every": 0,
        "train_gpus": 1,
        "eval_gpus": args.eval_gpus,
        "eval_batch_size": 8,
    }


def _timed(tracker, stats: dict) -> None:
    """Count the time MLflow work is under way (wall: while any logging lane is busy, so
    parallel lanes are not counted twice) and the CPU time of the threads doing it."""
    for name in ("_log_cell", "_write_points", "_end_training", "start_invocation",
                 "finish_invocation"):  # fmt: skip
        original = getattr(tracker, name)

        def wrapper(*a, _original=original, **k):
            cpu = time.thread_time()
            with stats["lock"]:
                if stats["busy"] == 0:
                    stats["since"] = time.perf_counter()
                stats["busy"] += 1
            try:
                return _original(*a, **k)
            finally:
                with stats["lock"]:
                    stats["busy"] -= 1
                    if stats["busy"] == 0:
                        stats["wall"] += time.perf_counter() - stats["since"]
                    stats["cpu"] += time.thread_time() - cpu
                    stats["last"] = time.time()

        setattr(tracker, name, wrapper)


def one_size(args) -> dict:
    """One grid size in this process (its peak RSS is the driver's): run, measure, verify."""

    grid = parse_grid(scale_grid(f"scale_{args.one}", args.one, args))
    root = Path(args.out)
    store = ResultStore(root, grid.name)
    tracked = args.tracking_uri != "none"  # `--tracking none`: the same grid without MLflow
    tracker = Tracker(args.tracking_uri, root, grid.name, asynchronous=True) if tracked else None
    stats = {
        "wall": 0.0,
        "cpu": 0.0,
        "busy": 0,
        "since": 0.0,
        "last": 0.0,
        "lock": threading.Lock(),
    }
    if tracker is not None:
        _timed(tracker, stats)
    executor = RayExecutor(
        args.address, max_retries=5, eval_gpu_fraction=grid.eval_gpus, train_gpus=1
    ).start()
    gpus = executor.ray.cluster_resources().get("GPU", 0)
    if args.kill_node_at:
        threading.Thread(target=_kill_when, args=(store, args), daemon=True).start()
    cpu, started = time.process_time(), time.perf_counter()
    driver = run_grid(grid, store, executor, tracker, progress=False)
    if tracker is not None:
        tracker.flush()
    makespan = time.perf_counter() - started
    driver_cpu = time.process_time() - cpu
    executor.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = summarise(grid, store, makespan, driver_cpu, stats, gpus, args)
    result.update(
        cells=len(grid.expand()),
        written=len(driver.written),
        failed=len(driver.failed),
        peak_rss_gb=peak / 2**30,
    )
    result.update(mlflow_at_scale(tracker, store, grid))
    return result


def _kill_when(store, args) -> None:
    """Kill the cluster's node 1 (by its `ray start` process group) once half the cells exist."""
    while len(list(store.cells_dir.glob("*.json"))) < args.one * args.kill_node_at:
        time.sleep(0.5)
    os.killpg(args.kill_node_pid, signal.SIGKILL)
    print(f"scale: killed node 1 at {args.kill_node_at:.0%} of the cells", file=sys.stderr)


def summarise(grid, store, makespan, driver_cpu, stats, gpus, args) -> dict:
    """Makespan vs ideal, utilisation, per-cell overheads, saturation rate, encodings."""

    records = read_cells(store.cells_dir, grid.name)
    slot_seconds = sum(
        r.timings["train_seconds"] + args.eval_gpus * r.timings["eval_seconds"] for r in records
    )
    ideal = slot_seconds / gpus
    ends = sorted(r.timings["ended_at"] for r in records)
    quarter, three = len(ends) // 4, 3 * len(ends) // 4
    rate = (three - quarter) / max(ends[three - 1] - ends[quarter], 1e-9) if len(ends) > 8 else 0
    encoded = sum(r.timings.get("encoded_images", 0) for r in records)
    distinct = sum(r.timings.get("distinct_images", 0) for r in records)
    cells = max(len(records), 1)
    return {
        "makespan_s": makespan,
        "ideal_s": ideal,
        "ratio": makespan / ideal if ideal else float("nan"),
        "utilisation": ideal / makespan,
        "gpus": gpus,
        "driver_ms": 1000 * (driver_cpu - stats["cpu"]) / cells,
        "mlflow_ms": 1000 * stats["wall"] / cells,
        "mlflow_cpu_ms": 1000 * stats["cpu"] / cells,
        # how far MLflow trailed the grid: its last write after the last cell's end
        "lag_s": max(0.0, stats["last"] - ends[-1]) if ends else 0.0,
        "cells_per_s": rate,
        "encodings_per_image": encoded / max(distinct, 1),
        "lost": len({c.id for c in grid.expand()} - {r.cell_id for r in records}),
    }


def mlflow_at_scale(tracker, store, grid) -> dict:
    """Duplicated cell runs, and how long `sync`, the report (+ row runs) and a search take
    (zeros without MLflow: `--tracking none`)."""
    if tracker is None:
        return dict.fromkeys(("mlflow_runs", "duplicated", "unfinished_runs"), 0) | dict.fromkeys(
            ("search_s", "sync_s", "report_s"), 0.0
        )

    started = time.perf_counter()
    runs = tracker._search("tags.`fsbench.kind` = 'cell'")
    search = time.perf_counter() - started
    ids = [r.data.tags.get(CELL_TAG, "") for r in runs]
    unfinished = sum(r.info.status != "FINISHED" for r in runs)
    started = time.perf_counter()
    tracker.sync(store)
    sync = time.perf_counter() - started
    started = time.perf_counter()
    written = build_report(store.grid_dir, n_boot=100)
    tracker.log_report(store.grid_dir / "report", written.get("rows"))
    report = time.perf_counter() - started
    return {
        "mlflow_runs": len(runs),
        "duplicated": len(ids) - len(set(ids)),
        "unfinished_runs": unfinished,
        "search_s": search,
        "sync_s": sync,
        "report_s": report,
    }


def driver_restart(cluster, args, out: Path) -> dict:
    """`fsbench run` of a grid killed (SIGKILL) halfway, then rerun: cells recomputed?"""
    import yaml

    cells = min(args.cells)
    grid = scale_grid("scale_restart", cells, args)
    path = out / "restart.yaml"
    path.write_text(yaml.safe_dump(grid))
    command = [
        sys.executable, "-m", "fsbench.benchmarks.cli", "run", str(path),
        "--ray-address", cluster.address, "--results", str(out), "--quiet", "--no-report",
        "--tracking-uri", args.tracking_uri,
    ]  # fmt: skip
    first = subprocess.Popen(command, env=cluster.env, start_new_session=True)
    folder = out / "scale_restart" / "cells"
    while len(list(folder.glob("*.json"))) < cells // 2 and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    second = subprocess.run(command, env=cluster.env, capture_output=True, text=True)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    recomputed = sum(after.get(name) != stamp for name, stamp in before.items())
    return {
        "killed_after": len(before),
        "total": len(after),
        "recomputed": recomputed,
        "rerun_rc": second.returncode,
        "rerun_says": [ln for ln in second.stdout.splitlines() if "cells written" in ln],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--cpus-per-node", type=int, help="task slots per node (default: GPUs/eval_gpus)"
    )
    parser.add_argument("--cells", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--eval-gpus", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=4, help="training steps per cell")
    parser.add_argument("--step-seconds", type=float, default=1.0)
    parser.add_argument("--image-seconds", type=float, default=0.05)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument(
        "--tracking",
        nargs="+",
        choices=("none", "sqlite", "server", "postgres"),
        default=["sqlite"],
        help="MLflow backends, side by side: none (the baseline), an sqlite file, `mlflow "
        "server` over sqlite, `mlflow server` over a real PostgreSQL (needs its binaries and "
        "psycopg2)",
    )
    parser.add_argument("--kill-node", action="store_true", help="kill node 1 halfway (largest)")
    parser.add_argument("--kill-driver", action="store_true", help="kill + restart a driver")
    parser.add_argument("--out", help="results folder (default: a temporary one)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a size, in this process
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--kill-node-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--kill-node-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        print(f"scale: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.one:
        print("SCALE " + json.dumps(one_size(args)))
        return []
    out = Path(args.out or tempfile.mkdtemp(prefix="fsbench-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_sizes(args, out)
    except RuntimeError as error:  # a cluster or a driver that did not start
        print(f"scale: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _argument_problem(args) -> str | None:
    """What is impossible in the arguments (one line), or None."""
    whole = {
        "--nodes": args.nodes,
        "--gpus-per-node": args.gpus_per_node,
        "--steps": args.steps,
        "--episodes": args.episodes,
    }
    if args.cpus_per_node is not None:
        whole["--cpus-per-node"] = args.cpus_per_node
    for flag, value in whole.items():
        if value < 1:
            return f"{flag} {value}: must be at least 1"
    if any(size < 8 for size in args.cells):
        sizes = " ".join(map(str, args.cells))
        return f"--cells {sizes}: each size must be at least 8 (grids are multiples of 8 cells)"
    if not 0 < args.eval_gpus <= args.gpus_per_node or not math.isfinite(args.eval_gpus):
        return f"--eval-gpus {args.eval_gpus}: a GPU share > 0 and at most --gpus-per-node"
    for flag, value in (
        ("--step-seconds", args.step_seconds),
        ("--image-seconds", args.image_seconds),
    ):
        if not (math.isfinite(value) and value >= 0):
            return f"{flag} {value}: a time of 0 seconds or more"
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out}: exists and is not a folder; name a new or existing folder"
    return None


def _tracking_store(backend: str, out: Path, stack: contextlib.ExitStack) -> str:
    """The tracking URI of a backend: an sqlite file, or a real `mlflow server` (4 workers)
    over sqlite or over a real PostgreSQL, started here and stopped with `stack`."""
    if backend == "none":
        return "none"
    if backend == "sqlite":
        return f"sqlite:///{out}/mlflow-{backend}.db"
    database = None
    if backend == "postgres":
        database = stack.enter_context(LocalPostgres()).uri
    folder = out / f"mlflow-{backend}"
    return stack.enter_context(MlflowServer(folder, workers=4, backend=database)).uri


def _run_sizes(args, out: Path) -> list[dict]:

    open_dataset(scale_grid("x", 8, args)["dataset"])  # generated once, before the workers read it
    cpus = args.cpus_per_node or int(args.gpus_per_node / args.eval_gpus)
    results, restart = [], None
    with LocalCluster(args.nodes, args.gpus_per_node, cpus) as cluster:
        for backend in args.tracking:
            with contextlib.ExitStack() as stack:
                uri = _tracking_store(backend, out, stack)
                for size in sorted(args.cells):
                    kill = args.kill_node and size == max(args.cells)
                    command = [
                        sys.executable, "-m", "fsbench.benchmarks.tools.scale", "--one", str(size),
                        "--address", cluster.address, "--tracking-uri", uri, "--out",
                        str(out / backend), "--eval-gpus", str(args.eval_gpus), "--steps",
                        str(args.steps), "--step-seconds", str(args.step_seconds), "--episodes",
                        str(args.episodes), "--image-seconds", str(args.image_seconds),
                    ] + (["--kill-node-at", "0.5", "--kill-node-pid",
                          str(cluster.processes[2].pid)] if kill else [])  # fmt: skip
                    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True)
                    log = out / f"driver_{backend}_{size}.log"
                    log.write_text(done.stdout + done.stderr)
                    line = [ln for ln in done.stdout.splitlines() if ln.startswith("SCALE ")]
                    if not line:
                        raise RuntimeError(f"size {size} ({backend}) failed; its log: {log}")
                    result = json.loads(line[-1][6:])
                    result.update(node_killed=kill, tracking=backend)
                    results.append(result)
                    print(_row(result), flush=True)
                if args.kill_driver and backend == args.tracking[-1]:
                    args.tracking_uri = uri
                    restart = driver_restart(cluster, args, out)
    print(_table(results))
    if restart:
        print(
            f"driver killed after {restart['killed_after']} of {restart['total']} cells and "
            f"restarted: {restart['recomputed']} recomputed; {' '.join(restart['rerun_says'])}"
        )
    plot(results, out / "scale.png")
    print(f"plot: {out / 'scale.png'} (and .pdf); results and MLflow under {out}")
    for backend in args.tracking:
        last = [r for r in results if r["tracking"] == backend][-1]
        print(
            f"{backend}: {last['cells']} cells, makespan {last['ratio']:.2f} x ideal, driver "
            f"{last['driver_ms']:.1f} ms/cell, mlflow {last['mlflow_ms']:.1f} ms/cell (lag "
            f"{last['lag_s']:.1f} s), lost {last['lost']}, duplicated {last['duplicated']}"
        )
    return results


if __name__ == "__main__":
    main()
