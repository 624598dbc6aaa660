"""The live training runs of a Tracker (tracker.py): each model's curve, logged while it trains,
in a run of its own beside its cells' runs."""

from __future__ import annotations

import time

from fsbench.benchmarks.tracking.cell_run import KIND_TAG, flatten, system_points
from fsbench.benchmarks.tracking.grid_runs import _param

LIVE_INTERVAL_SECONDS = 5.0  # a training curve reaches MLflow at least this often


def training_about(config: dict, cells: list) -> dict:
    """What a training run says about itself: a description, its settings as parameters (the
    method, its keywords, the dataset, fold, shot and every training key) and the cells it
    serves."""
    train = config.get("train") or {}
    stages = " → ".join(
        f"{s['name']} {s.get('steps', train.get('steps'))}" for s in train.get("stages", ())
    )
    description = (
        f"**Training of {cells[0].title.split(' · ')[0]}** (`{config['method']}`): fold "
        f"{config['fold']}, {config['shot']}-shot, {train.get('steps')} steps"
        + (f" in stages {stages}" if stages else "")
        + f", seed {train.get('seed', 0)}"
        + (f", starting from model {config['init_from']}" if config.get("init_from") else "")
        + f". Its model serves {len(cells)} cell run(s) (tag fsbench.cells; each cell run links "
        "back with fsbench.training_run). `train/segmentation` is the like-for-like curve across "
        "methods; `train/total` adds each method's own terms (PANet's PAR, auxiliary losses)."
    )
    params = flatten("method_kwargs", config.get("method_kwargs") or {}, {})
    params.update(flatten("train", train, {}))
    params.update({"method": config["method"], "fold": config["fold"], "shot": config["shot"]})
    return {"description": description, "params": params, "cells": [c.id for c in cells]}


class TrainingRuns:
    """Mixed into Tracker: uses its client, experiment, parent run, logging lanes and _warn."""

    def log_progress(self, key: str, name: str, point: dict, about: tuple | None = None) -> None:
        """A training curve point of the model `key`, logged while it trains (its own run);
        `about` (first point): the training job's (config, cells)."""
        if about is not None and key not in self._about:
            self._about[key] = training_about(*about)
        if self.available and self.experiment_id is not None:
            self._submit(self._log_point, key, name, point, lane=key)

    def training_run(self, key: str) -> str | None:
        """The run id of the model `key`'s training run, when one was logged (this invocation's
        or an earlier one's)."""
        if key in self._training_ids:
            return self._training_ids[key]
        found = self._search(f"tags.`fsbench.model_key` = '{key}'") if key else []
        run_id = next(
            (r.info.run_id for r in found if r.data.tags.get(KIND_TAG) == "training"), None
        )
        self._training_ids[key] = run_id
        return run_id

    def finish_training(self, key: str, system: list[dict] = ()) -> None:
        if self._lanes:  # (its points went to its lane: the run ends after them)
            self._submit(self._end_training, key, list(system), lane=key)

    def _log_point(self, key: str, name: str, point: dict) -> None:
        """Buffer a curve point; write a model's buffer every few seconds (one batch, not one
        transaction per point: a live curve without taxing the cores the grid runs on)."""
        buffered = self._points.setdefault(key, [])
        buffered.append(point)
        if time.monotonic() - self._flushed.get(key, 0.0) >= LIVE_INTERVAL_SECONDS:
            self._write_points(key, name)

    def _write_points(self, key: str, name: str = "") -> None:
        from mlflow.entities import Metric

        points = self._points.pop(key, [])
        self._flushed[key] = time.monotonic()
        if not points:
            return
        try:
            if key not in self._training_runs:
                about = self._about.get(key, {})
                tags = {
                    KIND_TAG: "training",
                    "fsbench.model_key": key,
                    # under the grid's stable run, beside the cells it serves
                    "mlflow.parentRunId": self._grid_run(),
                    "fsbench.invocation": self._parent(),
                    "fsbench.cells": ",".join(about.get("cells", ()))[:5000],
                }
                if about.get("description"):
                    tags["mlflow.note.content"] = about["description"]
                run = self.client.create_run(
                    self.experiment_id,
                    start_time=points[0].get("time"),
                    run_name=name,
                    tags=tags,
                )
                self._training_runs[key] = self._training_ids[key] = run.info.run_id
                params = [_param(k, v) for k, v in sorted(about.get("params", {}).items())]
                for start in range(0, len(params), 100):
                    self.client.log_batch(run.info.run_id, params=params[start : start + 100])
            metrics = [
                Metric(f"train/{k}", float(v), p.get("time") or int(time.time() * 1000), p["step"])
                for p in points
                for k, v in p.items()
                if k not in ("step", "time")
            ]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(
                    self._training_runs[key], metrics=metrics[start : start + 1000]
                )
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    def _end_training(self, key: str, system: list[dict]) -> None:
        from mlflow.entities import Metric

        self._write_points(key)
        if key not in self._training_runs:  # no curve point was ever reported
            return
        try:
            run_id, points = self._training_runs[key], [Metric(*p) for p in system_points(system)]
            for start in range(0, len(points), 1000):
                self.client.log_batch(run_id, metrics=points[start : start + 1000])
            self.client.set_terminated(self._training_runs.pop(key), "FINISHED")
        except Exception as error:  # noqa: BLE001
            self._warn(error)
