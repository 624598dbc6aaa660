"""The live training runs of a Tracker (tracker.py): each model's curve, logged while it trains,
in a run of its own beside its cells' runs."""

from __future__ import annotations

import time

from fsbench.benchmarks.tracking.cell_run import KIND_TAG, system_points

LIVE_INTERVAL_SECONDS = 5.0  # a training curve reaches MLflow at least this often


class TrainingRuns:
    """Mixed into Tracker: uses its client, experiment, parent run, logging thread and _warn."""

    def log_progress(self, key: str, name: str, point: dict) -> None:
        """A training curve point of the model `key`, logged while it trains (its own run)."""
        if self.available and self.experiment_id is not None:
            self._submit(self._log_point, key, name, point)

    def finish_training(self, key: str, system: list[dict] = ()) -> None:
        if self._thread is not None:
            self._submit(self._end_training, key, list(system))

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
                run = self.client.create_run(
                    self.experiment_id,
                    start_time=points[0].get("time"),
                    run_name=name,
                    tags={
                        KIND_TAG: "training",
                        "fsbench.model_key": key,
                        "mlflow.parentRunId": self._parent(),
                    },
                )
                self._training_runs[key] = run.info.run_id
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
