"""The `fsbench` subcommands that talk to MLflow's store alone: ui (serve it) and sync (push
what a run could not log). Each returns the exit status; a user's mistake is an FsbenchError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fsbench.benchmarks.cli.commands import _results_root
from fsbench.core import FsbenchError


def cmd_ui(args) -> int:
    """Serve the MLflow UI light (one worker, no job runner) and print the URL that opens the
    grid's runs view directly (MLflow 3 otherwise opens an experiment on its GenAI overview)."""
    from fsbench.benchmarks.tracking.tracker import default_tracking_uri, redacted, runs_url

    root = _results_root(args)
    uri = args.tracking_uri or default_tracking_uri(root)
    base = f"http://{args.host}:{args.port}"
    grid = args.grid or _latest_grid(root)
    experiment_id = _experiment_id(uri, grid) if grid else None
    where = runs_url(base, experiment_id) if experiment_id else base
    print(f"MLflow UI for {redacted(uri)}: open {where}  (Ctrl-C stops it)", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", (root / "mlartifacts").as_uri()]
    # one process, not fourteen: no uvicorn worker pool and no huey job consumers (they serve
    # MLflow's GenAI jobs, which a results store never has)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(command, env=env)


def _latest_grid(root: Path) -> str | None:
    """The grid whose cells changed last under `root` (None when there are none)."""
    grids = [p.parent for p in root.glob("*/cells") if p.is_dir()]
    return max(grids, key=lambda p: p.stat().st_mtime).name if grids else None


def _experiment_id(uri: str, grid: str) -> str | None:
    """The grid's experiment id in the store, None when the store or experiment is absent."""
    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(grid)
    except Exception:  # noqa: BLE001 - the UI still starts; the printed URL is the root
        return None
    return found.experiment_id if found is not None else None


def cmd_sync(args) -> int:
    from fsbench.benchmarks.grid.files import check_grid_name
    from fsbench.benchmarks.store.results import GridLock, ResultStore
    from fsbench.benchmarks.tracking.tracker import Tracker, default_tracking_uri, redacted

    root = _results_root(args)
    uri = args.tracking_uri or default_tracking_uri(root)
    # a grid's folder (its cells, its plan or the lock of a run still starting)
    found = sorted(
        {
            p.parent.name
            for pattern in ("*/cells", "*/plan.json", "*/.lock")
            for p in root.glob(pattern)
        }
    )
    if args.grid and args.grid not in found:
        check_grid_name(args.grid)
        raise FsbenchError(
            f"{root / args.grid}: no results for grid {args.grid!r} to sync "
            f"({'grids here: ' + ', '.join(found) if found else 'none here'}; run it first, "
            "or pass --results FOLDER)"
        )
    if not found:
        raise FsbenchError(f"{root}: no grid results to sync (run a grid first, or --results)")
    grids = [args.grid] if args.grid else found
    status = 0
    for name in grids:
        store = ResultStore(root, check_grid_name(name))
        with GridLock(store, f"fsbench sync {name}"):  # one writer of the grid's runs
            tracker = Tracker(uri, root, name)
            rejected: dict[str, str] = {}
            try:
                pushed, total = tracker.sync(store, rejected)
            except Exception as error:  # noqa: BLE001
                raise FsbenchError(
                    f"MLflow at {redacted(uri)} is unreachable ({type(error).__name__}); try later"
                ) from None
        print(
            f"{name}: pushed {pushed} of {total} cells ({total - pushed} were already logged)"
            if tracker.available
            else f"{name}: MLflow unreachable, nothing pushed"
        )
        for file_name, problem in sorted(rejected.items()):
            print(f"fsbench: sync: {name}: left out cells/{file_name}: {problem}", file=sys.stderr)
        status |= 0 if tracker.available and not rejected else 1
    return status
