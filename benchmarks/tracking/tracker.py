"""MLflow tracking (only this module imports mlflow): one experiment per grid, a parent run per
invocation, a child run per cell. If the server cannot be reached the grid goes on; `sync` later
pushes every cell that has no finished child run yet (so nothing is logged twice)."""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

from fsbench.benchmarks.store.records import CellRecord
from fsbench.benchmarks.tracking.cell_run import (  # noqa: F401 (names older callers import from here)
    CELL_TAG,
    KIND_TAG,
    RECORD_TAG,
    cell_params,
    cell_tags,
    default_tracking_uri,
    episode_rows,
    local_store,
    manifest_datasets,
    metric_points,
    record_digest,
    redacted,
    run_name,
    runs_url,
    system_points,
    write_artifacts,
)
from fsbench.benchmarks.tracking.grid_runs import (  # noqa: F401 (grid_settings re-exported)
    _manifest_inputs,
    _param,
    describe_grid,
    grid_settings,
    leaderboard_view,
    log_rows,
)
from fsbench.benchmarks.tracking.lanes import WORKERS_VARIABLE, LoggingLanes, logging_workers  # noqa: F401
from fsbench.benchmarks.tracking.training_runs import LIVE_INTERVAL_SECONDS, TrainingRuns  # noqa: F401
from fsbench.core import FsbenchError

RESULTS_TAG = "fsbench.results"  # the results folder an invocation wrote


class Tracker(LoggingLanes, TrainingRuns):
    """Driver-side MLflow logging that degrades to 'log later' instead of stopping the grid."""

    def __init__(
        self,
        uri: str,
        results_root: Path,
        experiment: str | None = None,
        asynchronous: bool = False,
        workers: int | None = None,
    ):
        # No usage telemetry: it costs ~80 ms per logged cell here and phones home.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # Not a "View run … at" line on stdout per run ended on a server (thousands per grid)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FsbenchError(
                "tracking needs mlflow: pip install 'mlflow>=2.14' (or --no-tracking)"
            ) from None
        self.uri = uri
        self.results_root = Path(results_root).resolve()
        self.experiment_name = experiment
        self.experiment_id = None
        self.parent_run_id = None
        self.available = True
        self.pending = 0
        # A logging thread keeps MLflow off the driver's path (the cell files stay the truth:
        # what a stopped driver did not log, the next run or `sync` does).
        self.asynchronous = asynchronous
        # Logging lanes: one thread each, so a tracking server (or a database) that serves
        # requests in parallel is fed in parallel; a model's training run and its cells share
        # a lane (in order). An sqlite file takes one writer at a time: one lane.
        self.workers = max(1, workers or logging_workers(uri))
        self._lanes: list[tuple[queue.Queue, threading.Thread]] = []
        self._next_lane = 0
        self._lock = threading.RLock()  # pending count, runs created once (grid, invocation)
        self._training_runs: dict[str, str] = {}  # model key → its live training run
        self._points: dict[str, list] = {}  # model key → curve points not written yet
        self._flushed: dict[str, float] = {}  # model key → when its points were last written
        self._about: dict[str, dict] = {}  # model key → its training's description, params
        self._training_ids: dict[str, str | None] = {}  # model key → training run (found)
        self._runs_of_cells: dict[str, list] | None = None  # cell id → its runs (_cell_runs)
        self.client = None
        try:  # a sqlite store is opened (and its schema checked) right here
            self.client = MlflowClient(tracking_uri=uri)
        except Exception as error:  # noqa: BLE001 - a damaged store means "log later"
            self._warn(error)

    def _warn(self, error: Exception) -> None:
        if self.available:
            print(
                f"fsbench: MLflow at {redacted(self.uri)} unreachable "
                f"({type(error).__name__}); results still go to results/; run "
                "`run_benchmark.py sync` later",
                file=sys.stderr,
            )
        self.available = False

    def _experiment(self, name: str) -> str:
        local = local_store(self.uri)
        location = (self.results_root / "mlartifacts" / name).as_uri() if local else None
        found = self.client.get_experiment_by_name(name)
        if found is not None and local and not self._inside(found.artifact_location):
            # A results folder copied or moved: its store still points at the origin's
            # artifacts. Retire that experiment (renamed, deleted) and log afresh here, so
            # nothing is ever written into the origin; the cell files re-log every cell.
            moved = f"{name} (moved from {found.artifact_location}) {found.experiment_id}"
            self.client.rename_experiment(found.experiment_id, moved)
            self.client.delete_experiment(found.experiment_id)
            print(
                f"fsbench: {self.results_root} was copied or moved (its MLflow experiment "
                f"{name!r} kept artifacts at {found.artifact_location}); logging its cells "
                "afresh under this folder",
                file=sys.stderr,
            )
            found = None
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=location)

    def _inside(self, artifact_location: str) -> bool:
        """Whether a local experiment's artifacts live under the results folder in use."""
        if not artifact_location.startswith("file:"):
            return True  # not ours to judge (a server's artifact store)
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(artifact_location).path))
        return path == self.results_root or self.results_root in path.parents

    def start_invocation(self, grid, plan, store=None) -> None:
        """Open the experiment, repair what earlier invocations left (runs of killed drivers,
        cells whose file is newer than their run or that were never logged) and, if there is
        anything to do, create this invocation's parent run."""
        self.experiment_name = self.experiment_name or grid.name
        self._counts = {"cells_total": len(plan.cells), "cells_todo": len(plan.todo)}
        if not self.available:
            return
        try:
            self.experiment_id = self._experiment(self.experiment_name)
            self._close_leftovers()
            describe_grid(self, grid)  # the grid run's settings and note
            if plan.todo:
                self._parent()
            if store is not None:  # cells finished earlier but missing or stale in MLflow
                todo = {c.id for c in plan.todo}
                for cell in self._unlogged(store.load_cells()):
                    if cell.cell_id not in todo:
                        self.log_cell(cell, store)
        except Exception as error:  # noqa: BLE001 - any failure means "log later"
            self._warn(error)

    def _parent(self) -> str:
        """This invocation's parent run, created on first need (a no-op rerun leaves none)."""
        with self._lock:  # (logging lanes ask for it too: created once)
            if self.parent_run_id is None:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=f"{self.experiment_name} invocation",
                    tags={
                        KIND_TAG: "invocation",
                        RESULTS_TAG: str(self.results_root),
                        "mlflow.parentRunId": self._grid_run(),
                    },
                )
                self.parent_run_id = run.info.run_id
                counts = getattr(self, "_counts", {})
                if counts:
                    self.client.log_batch(
                        self.parent_run_id, params=[_param(k, v) for k, v in counts.items()]
                    )
            return self.parent_run_id

    def _grid_run(self) -> str:
        """The grid's one stable run: parent of every invocation, holder of the report."""
        with self._lock:
            if getattr(self, "_grid_run_id", None) is None:
                found = self._search(f"tags.{KIND_TAG} = 'grid'")
                if found:
                    self._grid_run_id = found[0].info.run_id
                else:
                    run = self.client.create_run(
                        self.experiment_id,
                        run_name=self.experiment_name,
                        tags={KIND_TAG: "grid", RESULTS_TAG: str(self.results_root)},
                    )
                    self.client.set_terminated(run.info.run_id, "FINISHED")
                    self._grid_run_id = run.info.run_id
            return self._grid_run_id

    def _close_leftovers(self) -> None:
        """Runs a killed driver left RUNNING. The caller holds the grid's lock, so no live
        fsbench process writes this results folder's runs: an invocation still RUNNING is
        marked KILLED, a cell run FAILED (the cell is logged again from its file, if any)."""
        for run in self._search("attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if tags.get(KIND_TAG) == "invocation" and tags.get(RESULTS_TAG, "") in (
                "",
                str(self.results_root),
            ):
                self.client.set_terminated(run.info.run_id, "KILLED")
            elif tags.get(KIND_TAG) in ("cell", "training"):
                self.client.set_terminated(run.info.run_id, "FAILED")
        self._runs_of_cells = None  # (statuses changed: read afresh when first needed)

    def _search(self, query: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], query, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _unlogged(self, cells: list[CellRecord]) -> list[CellRecord]:
        """The cells without a FINISHED run logged from this very file."""
        logged = self.logged_cells()
        return [c for c in cells if logged.get(c.cell_id) != record_digest(c)]

    def finish_invocation(self, status: str = "FINISHED") -> None:
        self.flush()
        for key in list(self._training_runs):  # trainings that never finished (failed, killed)
            try:
                self.client.set_terminated(self._training_runs.pop(key), "FAILED")
            except Exception as error:  # noqa: BLE001
                self._warn(error)
        if self.available and self.parent_run_id:
            try:
                self.client.set_terminated(self.parent_run_id, status)
            except Exception as error:  # noqa: BLE001
                self._warn(error)

    def logged_cells(self) -> dict[str, str]:
        """cell id → the digest of the cell record its FINISHED run was logged from."""
        return {
            cell_id: digest
            for cell_id, runs in self._cell_runs().items()
            for _, status, digest in runs
            if status == "FINISHED"
        }

    def log_cell(self, result: CellRecord, store) -> bool:
        """Create the cell's child run (replacing an unfinished one); False if MLflow is down.
        Asynchronous: queued for the logging thread (True)."""
        if not self.available or self.experiment_id is None:
            self._count_pending()
            return False
        if self.asynchronous:
            self._submit(
                self._log_now, result, store, lane=result.model_key if result.train else None
            )
            return True
        return self._log_now(result, store)

    def _log_now(self, result: CellRecord, store) -> bool:
        try:
            self._log_cell(result, store)
            return True
        except Exception as error:  # noqa: BLE001
            self._warn(error)
            self._count_pending()
            return False

    def _log_cell(self, result: CellRecord, store) -> None:
        from mlflow.entities import Metric

        client = self.client
        cell_id = result.cell_id
        previous = self._cell_runs().get(cell_id, [])
        digest = record_digest(result)
        if ("FINISHED", digest) in {(status, logged) for _, status, logged in previous}:
            return  # this very file is logged (e.g. by an earlier sync): never twice
        # Unfinished runs (a driver killed mid-log) and runs of an older file of this cell (before
        # a --rerun) must not count: they go to MLflow's deleted runs, and the file is logged anew.
        for stale, _, _ in previous:
            client.delete_run(stale)
        self._runs_of_cells[cell_id] = []
        timings = result.timings
        now = time.time()
        start_ms = int(1000 * timings.get("started_at", now))
        end_ms = int(1000 * timings.get("ended_at", now))
        tags = cell_tags(result, digest)
        tags["mlflow.parentRunId"] = self._parent()
        training = self.training_run(result.model_key) if result.train else None
        if training:  # the run whose curve trained this cell's model
            tags["fsbench.training_run"] = training
        run = client.create_run(
            self.experiment_id, start_time=start_ms, run_name=run_name(result), tags=tags
        )
        run_id = run.info.run_id
        params = [_param(k, v) for k, v in sorted(cell_params(result).items())]
        entries = [Metric(*point) for point in metric_points(result, end_ms)]
        for start in range(0, max(len(entries), len(params)), 500):  # (tags: at create_run)
            client.log_batch(
                run_id,
                metrics=entries[start : start + 500],
                params=params[start : start + 100] if start == 0 else [],
            )
        for start in range(100, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_inputs(run_id, datasets=_manifest_inputs(result, store))
        with tempfile.TemporaryDirectory() as folder:
            write_artifacts(result, store, Path(folder))
            # One upload to the new run's own artifact location (what `log_artifacts` does
            # after fetching the run again: a store round trip per cell saved)
            self._artifacts(run.info.artifact_uri).log_artifacts(folder)
        client.set_terminated(run_id, "FINISHED", end_time=end_ms)
        self._runs_of_cells[cell_id] = [(run_id, "FINISHED", digest)]

    def _artifacts(self, artifact_uri: str):
        """The artifact repository of a run's artifact location (local folder, proxied
        `mlflow-artifacts:` server, object store), as MlflowClient resolves it."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(artifact_uri, tracking_uri=self.uri)

    def _cell_runs(self) -> dict[str, list]:
        """cell id → (run id, status, record digest) of its cell runs, read once (one search,
        not one per cell: at thousands of cells a search per cell cost more than the logging).
        Only this tracker writes them while the grid's lock is held; `sync` and a new
        invocation read them afresh."""
        if self._runs_of_cells is None:
            self._runs_of_cells = {}
            for run in self._search(f"tags.{KIND_TAG} = 'cell'"):
                tags = run.data.tags
                self._runs_of_cells.setdefault(tags.get(CELL_TAG, ""), []).append(
                    (run.info.run_id, run.info.status, tags.get(RECORD_TAG, ""))
                )
        return self._runs_of_cells

    def log_report(self, report_dir: Path, rows: list[dict] | None = None) -> None:
        """The grid's report (tables, figures) as artifacts of its stable grid run, and one row
        run per table row (the report's Mean column, in percent) with its cells nested under it:
        the runs table answers "which method is best" before any click."""
        if not self.available or not Path(report_dir).is_dir():
            return
        try:
            if self.experiment_id is None:
                self.experiment_id = self._experiment(self.experiment_name)
            self.flush()  # every cell run exists before it is nested under its row
            self.client.log_artifacts(self._grid_run(), str(report_dir), "report")
            if rows:
                log_rows(self, rows)
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    def shared_view(self) -> str | None:
        """The leaderboard's shared-view key when the experiment holds it (after a report)."""
        return leaderboard_view(self.client, self.experiment_id) if self.available else None

    def sync(self, store, rejected: dict | None = None) -> tuple[int, int]:
        """Repair leftovers and push every cell of `store` without a FINISHED run logged from
        its current file; (pushed, total). Cell files left out (torn, edited) land in
        `rejected`: file name → why."""
        cells = store.load_cells(rejected)
        if not cells:
            return 0, 0
        if self.client is None:
            raise ConnectionError(f"cannot open the tracking store {redacted(self.uri)}")
        self.experiment_name = self.experiment_name or cells[0].grid
        self.experiment_id = self._experiment(self.experiment_name)
        self._close_leftovers()
        missing = self._unlogged(cells)
        pushed = sum(self.log_cell(c, store) for c in missing)
        if self.parent_run_id:
            self.finish_invocation("FINISHED" if pushed == len(missing) else "FAILED")
        return pushed, len(cells)
