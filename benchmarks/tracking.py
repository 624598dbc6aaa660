"""MLflow tracking (only this module imports mlflow): one experiment per grid, a parent run per
invocation, a child run per cell. If the server cannot be reached the grid goes on; `sync` later
pushes every cell that has no finished child run yet (so nothing is logged twice)."""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from fsbench.datasets.registry import FsbenchError

CELL_TAG = "fsbench.cell_id"
KIND_TAG = "fsbench.kind"
# The cell file's `finished_at` a run was logged from: a rerun's newer file replaces the run.
FINISHED_TAG = "fsbench.finished_at"
RESULTS_TAG = "fsbench.results"  # the results folder an invocation wrote


def redacted(uri: str) -> str:
    """`uri` with any password replaced by ***, for messages (user:PASS@host → user:***@host)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def default_tracking_uri(results_root: Path) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(results_root).resolve()}/mlflow.db"
    )


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def episode_rows(result: dict, manifests_dir: Path) -> list[dict]:
    """Per-episode rows (classes, query ids, TP/FP/FN and IoU per episode class) for every seed."""
    rows = []
    for seed in result["seeds"]:
        counts = seed["counts"]
        manifest_file = manifests_dir / f"{seed['manifest_fingerprint'][:16]}.json"
        try:
            episodes = json.loads(manifest_file.read_text())["episodes"]
        except (OSError, ValueError, KeyError, TypeError):
            episodes = []  # missing or damaged (the next `run` rewrites it): rows without ids
        for index, per_class in enumerate(counts["per_class"]):
            spec = episodes[index] if index < len(episodes) else {}
            for class_id, (tp, fp, fn) in zip(counts["classes"], per_class):
                if tp + fp + fn == 0:
                    continue
                rows.append(
                    {
                        "seed": seed["seed"],
                        "episode": index,
                        "class": class_id,
                        "query": " ".join(spec.get("query", [])),
                        "support": " ".join(sum(spec.get("support", []), [])),
                        "tp": tp,
                        "fp": fp,
                        "fn": fn,
                        "iou": tp / (tp + fp + fn),
                    }
                )
    return rows


class Tracker:
    """Driver-side MLflow logging that degrades to 'log later' instead of stopping the grid."""

    def __init__(self, uri: str, results_root: Path, experiment: str | None = None):
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
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri:
            location = (self.results_root / "mlartifacts" / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

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
            if plan.todo:
                self._parent()
            if store is not None:  # cells finished earlier but missing or stale in MLflow
                todo = {c.id for c in plan.todo}
                for cell in self._unlogged(store):
                    if cell["cell_id"] not in todo:
                        self.log_cell(cell, store)
        except Exception as error:  # noqa: BLE001 - any failure means "log later"
            self._warn(error)

    def _parent(self) -> str:
        """This invocation's parent run, created on first need (a no-op rerun leaves none)."""
        if self.parent_run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.experiment_name} invocation",
                tags={KIND_TAG: "invocation", RESULTS_TAG: str(self.results_root)},
            )
            self.parent_run_id = run.info.run_id
            counts = getattr(self, "_counts", {})
            if counts:
                self.client.log_batch(
                    self.parent_run_id, params=[_param(k, v) for k, v in counts.items()]
                )
        return self.parent_run_id

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
            elif tags.get(KIND_TAG) == "cell":
                self.client.set_terminated(run.info.run_id, "FAILED")

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

    def _unlogged(self, store) -> list[dict]:
        """Cells of `store` without a FINISHED run logged from this very file."""
        logged = self.logged_cells()
        return [c for c in store.load_cells() if logged.get(c["cell_id"]) != c.get("finished_at")]

    def finish_invocation(self, status: str = "FINISHED") -> None:
        if self.available and self.parent_run_id:
            try:
                self.client.set_terminated(self.parent_run_id, status)
            except Exception as error:  # noqa: BLE001
                self._warn(error)

    def logged_cells(self) -> dict[str, str]:
        """cell id → the `finished_at` of the cell file its FINISHED run was logged from."""
        return {
            run.data.tags[CELL_TAG]: run.data.tags.get(FINISHED_TAG, "")
            for run in self._search(f"tags.{KIND_TAG} = 'cell'")
            if run.info.status == "FINISHED"
        }

    def log_cell(self, result: dict, store) -> bool:
        """Create the cell's child run (replacing an unfinished one); False if MLflow is down."""
        if not self.available or self.experiment_id is None:
            self.pending += 1
            return False
        try:
            self._log_cell(result, store)
            return True
        except Exception as error:  # noqa: BLE001
            self._warn(error)
            self.pending += 1
            return False

    def _log_cell(self, result: dict, store) -> None:
        from mlflow.entities import Metric, RunTag

        client = self.client
        cell_id = result["cell_id"]
        previous = client.search_runs(
            [self.experiment_id], f"tags.{CELL_TAG} = '{cell_id}'", max_results=100
        )
        finished_at = result.get("finished_at", "")
        if any(
            r.info.status == "FINISHED" and r.data.tags.get(FINISHED_TAG, "") == finished_at
            for r in previous
        ):
            return  # this very file is logged (e.g. by an earlier sync): never twice
        # Unfinished runs (a driver killed mid-log) and runs of an older file of this cell (before
        # a --rerun) must not count: they go to MLflow's deleted runs, and the file is logged anew.
        for stale in previous:
            client.delete_run(stale.info.run_id)
        config = result["config"]
        tags = {
            KIND_TAG: "cell",
            CELL_TAG: cell_id,
            "method": config["method"],
            "row": config["row"],
            "dataset": config["dataset"]["name"],
            "fold": str(config["fold"]),
            "way": str(config["way"]),
            "shot": str(config["shot"]),
            "protocol": config["protocol"],
            "git_sha": result["environment"]["git_sha"],
            "device": result["environment"]["device"],
            "manifest_fingerprints": ",".join(
                s["manifest_fingerprint"][:16] for s in result["seeds"]
            ),
            FINISHED_TAG: finished_at,
        }
        tags["mlflow.parentRunId"] = self._parent()
        run = client.create_run(self.experiment_id, run_name=result["title"], tags=tags)
        run_id = run.info.run_id
        params = [_param(k, v) for k, v in sorted(flatten("", config, {}).items())]
        summary = result["summary"]
        metrics = {
            "miou": summary["miou_mean"],
            "miou_std": summary["miou_std"],
            "fb_iou": summary["fb_iou_mean"],
            "fb_iou_std": summary["fb_iou_std"],
            "train_seconds": result["timings"]["train_seconds"],
            "eval_seconds": result["timings"]["eval_seconds"],
        }
        for key in ("encoded_images", "distinct_images"):  # older cells lack them
            if key in result["timings"]:
                metrics[key] = result["timings"][key]
        for seed in result["seeds"]:
            metrics[f"miou_seed_{seed['seed']}"] = seed["miou"]
            metrics[f"fb_iou_seed_{seed['seed']}"] = seed["fb_iou"]
        for class_id, value in summary["class_iou_mean"].items():
            if value is not None:  # None: the class never occurred
                metrics[f"class_iou_{class_id}"] = value
        stamp = 0
        entries = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        for point in (result.get("train") or {}).get("curve", []):
            for name, value in point.items():
                if name != "step":
                    entries.append(Metric(f"train_{name}", float(value), stamp, point["step"]))
        for start in range(0, max(len(entries), len(params)), 500):
            client.log_batch(
                run_id,
                metrics=entries[start : start + 500],
                params=params[start : start + 100] if start == 0 else [],
                tags=[RunTag(k, v) for k, v in tags.items()] if start == 0 else [],
            )
        for start in range(100, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "config.json").write_text(json.dumps(result["config"], indent=1))
            rows = episode_rows(result, store.manifests_dir)
            with open(folder / "episodes.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["episode"])
                writer.writeheader()
                writer.writerows(rows)
            client.log_artifact(run_id, str(folder / "config.json"))
            client.log_artifact(run_id, str(folder / "episodes.csv"))
            figure = _qualitative(result, store, folder)
            if figure is not None:
                client.log_artifact(run_id, str(figure))
        client.set_terminated(run_id, "FINISHED")

    def sync(self, store) -> tuple[int, int]:
        """Repair leftovers and push every cell of `store` without a FINISHED run logged from
        its current file; (pushed, total)."""
        cells = store.load_cells()
        if not cells:
            return 0, 0
        if self.client is None:
            raise ConnectionError(f"cannot open the tracking store {redacted(self.uri)}")
        self.experiment_name = self.experiment_name or cells[0]["grid"]
        self.experiment_id = self._experiment(self.experiment_name)
        self._close_leftovers()
        missing = self._unlogged(store)
        pushed = sum(self.log_cell(c, store) for c in missing)
        if self.parent_run_id:
            self.finish_invocation("FINISHED" if pushed == len(missing) else "FAILED")
        return pushed, len(cells)


def _param(key, value):
    from mlflow.entities import Param

    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return Param(key, text[:6000])


def _qualitative(result: dict, store, folder: Path):
    try:
        from fsbench.benchmarks.report import qualitative_figure

        return qualitative_figure(result, store, folder / "qualitative.png", max_episodes=2)
    except Exception as error:  # noqa: BLE001 - a figure must never stop the logging
        print(f"fsbench: qualitative figure skipped ({error})", file=sys.stderr)
        return None
