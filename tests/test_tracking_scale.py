"""MLflow at cluster scale: logging lanes (order kept per model), how many a tracking URI gets,
the chart view's preset (sweep axes → parallel coordinates), and a real `mlflow server` backed
by a real PostgreSQL (slow; skipped with the reason where PostgreSQL is not installed)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml

from fsbench.benchmarks.tracking.grid_runs import chart_preset, shared_views, swept_kwargs
from fsbench.benchmarks.tracking.tracker import Tracker, logging_workers
from fsbench.core import FsbenchError


@pytest.mark.quick
def test_logging_lanes_by_uri_and_environment(monkeypatch):
    monkeypatch.delenv("FSBENCH_MLFLOW_WORKERS", raising=False)
    assert logging_workers("sqlite:////tmp/x/mlflow.db") == 1  # one writer at a time
    assert logging_workers("/tmp/mlruns") == 1
    assert logging_workers("http://mlflow.lab:5000") == 4
    assert logging_workers("postgresql+psycopg2://u@db/mlflow") == 4
    monkeypatch.setenv("FSBENCH_MLFLOW_WORKERS", "8")
    assert logging_workers("sqlite:////tmp/x/mlflow.db") == 8
    monkeypatch.setenv("FSBENCH_MLFLOW_WORKERS", "many")
    with pytest.raises(FsbenchError, match="FSBENCH_MLFLOW_WORKERS='many'"):
        logging_workers("http://mlflow.lab:5000")


@pytest.mark.quick
def test_lanes_run_in_parallel_and_keep_a_models_order(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, "lanes", workers=4)
    done, lock = [], threading.Lock()

    def work(key, index):
        time.sleep(0.01 if index % 2 else 0.0)  # unequal durations: order must not depend on them
        with lock:
            done.append((key, index, threading.current_thread().name))

    for index in range(12):
        for key in ("model-a", "model-b", "model-c"):
            tracker._submit(work, key, index, lane=key)
    for index in range(8):
        tracker._submit(work, "eval-only", index)  # no model: round robin
    tracker.flush()
    assert len(done) == 44 and not tracker._lanes
    for key in ("model-a", "model-b", "model-c"):
        mine = [(i, name) for k, i, name in done if k == key]
        assert [i for i, _ in mine] == list(range(12))  # points, end, cells: in order
        assert len({name for _, name in mine}) == 1  # one lane per model
    assert len({name for k, _, name in done if k == "eval-only"}) == 4  # spread over the lanes


class _Run:
    def __init__(self, method, **kwargs):
        self.data = type("Data", (), {})()
        self.data.params = {f"method_kwargs.{k}": str(v) for k, v in kwargs.items()}
        self.data.tags = {"method": method}


@pytest.mark.quick
def test_a_sweep_becomes_the_parallel_coordinates_axes():
    rows = [
        {"row": f"panet[alpha={a}]", "shot": 1, "cells": [f"c{a}"], "folds": ["fold0"]}
        for a in (5, 20)
    ] + [{"row": "hsnet", "shot": 1, "cells": ["h"], "folds": ["fold0"]}]
    runs = {
        "c5": _Run("panet", alpha=5.0, width=0.125),
        "c20": _Run("panet", alpha=20.0, width=0.125),
        "h": _Run("hsnet", layers=50),
    }
    axes = swept_kwargs(rows, runs)
    assert axes == {"panet[alpha=5]|1": {"alpha": "5.0"}, "panet[alpha=20]|1": {"alpha": "20.0"}}
    preset = chart_preset(["alpha"])
    kinds = [c["type"] for c in preset["compareRunCharts"]]
    assert kinds == ["BAR", "PARALLEL", "LINE"]
    parallel = preset["compareRunCharts"][1]
    assert parallel["selectedParams"] == ["alpha"] and parallel["selectedMetrics"] == ["miou"]
    line = preset["compareRunCharts"][2]
    assert line["metricKey"] == "train/segmentation"  # like for like, with or without PAR
    names = [s["name"] for s in preset["compareRunSections"]]
    assert names[0] == "Results" and names[-1] == "System metrics"
    sections = {s["uuid"] for s in preset["compareRunSections"]}
    assert all(c["metricSectionId"] in sections for c in preset["compareRunCharts"])
    assert [c["type"] for c in chart_preset([])["compareRunCharts"]] == ["BAR", "LINE"]
    views = shared_views(rows, ["alpha"])
    assert views["leaderboard"]["compareRunCharts"] == preset["compareRunCharts"]
    assert "'row'" not in views["charts"]["searchFilter"]  # rows and trainings: not by IN
    json.dumps(views)  # plain JSON, as MLflow reads it


@pytest.mark.slow
def test_a_grid_logs_to_an_mlflow_server_backed_by_postgresql(tmp_path, capsys):
    from fsbench.benchmarks.cli.main import main
    from fsbench.benchmarks.tools.cluster import LocalPostgres, MlflowServer, postgres_binaries

    folder, why = postgres_binaries()
    if folder is None:
        pytest.skip(f"no PostgreSQL to start here: {why}")
    grid = {
        "name": "pg",
        "dataset": {"name": "synthetic_pascal5i", "n_images": 60, "image_size": 32},
        "input_size": 32,
        "episodes": 4,
        "seeds": [1],
        "folds": [0, 1],
        "shots": [1],
        "methods": [{"name": "prototype_notrain", "sweep": {"alpha": [5, 20]}}],
    }
    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump(grid))
    with LocalPostgres() as database, MlflowServer(
        tmp_path / "server", workers=2, backend=database.uri
    ) as server:
        started = time.perf_counter()
        code = main(["run", str(path), "--serial", "--quiet", "--results", str(tmp_path / "r"),
                     "--tracking-uri", server.uri])  # fmt: skip
        seconds = time.perf_counter() - started
        assert code == 0
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("pg")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        kinds = [r.data.tags.get("fsbench.kind") for r in runs]
        assert kinds.count("cell") == 4 and kinds.count("row") == 2
        cells = [r for r in runs if r.data.tags.get("fsbench.kind") == "cell"]
        assert all(r.info.status == "FINISHED" and "miou" in r.data.metrics for r in cells)
        artifacts = {a.path for a in client.list_artifacts(cells[0].info.run_id)}
        assert {"config.json", "episodes.csv", "class_iou.csv", "seeds.csv"} <= artifacts
        rows = [r for r in runs if r.data.tags.get("fsbench.kind") == "row"]
        assert {r.data.params.get("alpha") for r in rows} == {"5", "20"}  # the sweep axis
        charts = json.loads(experiment.tags["mlflow.sharedViewState.charts"])
        assert "PARALLEL" in [c["type"] for c in charts["compareRunCharts"]]
        out = capsys.readouterr().out
        assert "View run" not in out  # no MLflow line per run on a server
    print(f"4 cells + report to mlflow server + PostgreSQL in {seconds:.1f} s")
