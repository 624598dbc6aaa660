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
    view = None
    if experiment_id:
        from mlflow.tracking import MlflowClient

        from fsbench.benchmarks.tracking.grid_runs import leaderboard_view

        view = leaderboard_view(MlflowClient(tracking_uri=uri), experiment_id)
    where = runs_url(base, experiment_id, view) if experiment_id else base
    moved = _moved_artifacts(uri, grid, root) if grid else None
    if moved:
        print(
            f"fsbench: ui: {root} was copied or moved: its MLflow store keeps the artifacts of "
            f"{grid!r} at {moved}; run `fsbench sync --results {root}` first (it relocates them "
            "here), then `fsbench ui`",
            file=sys.stderr,
        )
        return 2
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
    # no uvicorn worker pool and no huey job consumers (they serve MLflow's GenAI jobs, which a
    # results store never has)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"fsbench: starting the MLflow UI for {redacted(uri)} on {base} …", flush=True)
    # the server's own lines go to stderr: stdout carries fsbench's two lines (then the URL)
    try:
        logs = sys.stderr.fileno()
    except (AttributeError, OSError):  # a captured stderr without a descriptor
        logs = subprocess.DEVNULL
    server = subprocess.Popen(command, env=env, stdout=logs)
    try:
        if not _answers(f"{base}/health", server, timeout=args.wait):
            if server.poll() is None:
                server.terminate()
                print(
                    f"fsbench: ui: the MLflow server did not answer {base}/health within "
                    f"{args.wait:.0f} s; try again with --wait {2 * args.wait:.0f}",
                    file=sys.stderr,
                )
                return 1
            print(
                f"fsbench: ui: the MLflow server exited ({server.returncode}) before it "
                f"answered; is port {args.port} taken? (--port picks another)",
                file=sys.stderr,
            )
            return server.returncode or 1
        print(f"MLflow UI for {redacted(uri)}: open {where}  (Ctrl-C stops it)", flush=True)
        if view:
            print(f"  charts: {runs_url(base, experiment_id, 'charts')}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return 0


def _answers(url: str, server, timeout: float) -> bool:
    """Whether `url` answers 200 before `timeout` s pass (False at once if `server` exits)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _moved_artifacts(uri: str, grid: str, root: Path) -> str | None:
    """For a local store: the artifact location of the grid's experiment when it lies outside
    `root` (the folder was copied or moved); None otherwise."""
    if not uri.startswith("sqlite:") or not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(grid)
    except Exception:  # noqa: BLE001 - checked again by run/sync, which relocate
        return None
    if found is None or not found.artifact_location.startswith("file:"):
        return None
    inside = (root / "mlartifacts").resolve().as_uri()
    return None if found.artifact_location.startswith(inside) else found.artifact_location


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
