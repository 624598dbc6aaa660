"""What a researcher sees in the MLflow UI, read back through the MLflow client after a grid on
local Ray: display-named runs, one row run per table row holding the report's Mean column (in
percent) with its cells nested under it, few metrics per cell, live training curves, a grid run
with the grid's settings, and a `report` that refreshes them."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from fsbench.benchmarks.cli.main import main


@pytest.fixture(scope="module")
def tracked_grid(tmp_path_factory, voc_root):
    """A tiny two-method, two-fold grid run on local Ray with the default (sqlite) store."""
    tmp = tmp_path_factory.mktemp("view")
    grid = {
        "name": "view",
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "protocol": "panet",
        "input_size": 32,
        "episodes": 6,
        "seeds": [1, 2],
        "folds": [0, 1],
        "shots": [1],
        "methods": [{"name": "test_panet"}, "all_background"],
        "train": {"steps": 12, "lr_milestones": [10], "log_every": 2},
    }
    path = tmp / "view.yaml"
    path.write_text(yaml.safe_dump(grid))
    results = tmp / "r"
    code = main(["run", str(path), "--num-cpus", "2", "--quiet", "--results", str(results)])
    assert code == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("view")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {"client": client, "runs": runs, "results": results, "experiment": experiment}


def _kind(runs, kind):
    return [r for r in runs if r.data.tags.get("fsbench.kind") == kind]


@pytest.mark.slow
def test_cell_runs_are_named_for_people_in_percent_with_few_metrics(tracked_grid):
    cells = _kind(tracked_grid["runs"], "cell")
    assert len(cells) == 4
    names = {r.info.run_name for r in cells}
    assert "All background · fold 1 · 1-shot" in names
    assert any(name.startswith("test_panet · fold 0 · 1-shot") for name in names), names
    for run in cells:
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}
        assert len(metrics) <= 15, sorted(metrics)
        # the System metrics tab: the worker's CPU and memory over the cell's training and eval
        system = run.data.metrics
        assert system["system/process_memory_rss_megabytes"] > 50, sorted(system)
        assert system["system/cpu_utilization_percentage"] >= 0
        assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["fb_iou"] <= 100
        assert not any(k.startswith(("iou/", "seed/")) for k in metrics)
        assert "Protocol panet: 6 episodes × seeds 1, 2" in run.data.tags["mlflow.note.content"]
    background = next(r for r in cells if r.info.run_name.startswith("All background"))
    assert background.data.metrics["fb_iou"] > 1  # percent, not a fraction
    artifacts = {a.path for a in tracked_grid["client"].list_artifacts(background.info.run_id)}
    assert {"class_iou.csv", "seeds.csv", "episodes.csv"} <= artifacts


@pytest.mark.slow
def test_row_runs_hold_the_reports_mean_column_with_cells_nested(tracked_grid):
    runs = tracked_grid["runs"]
    rows = {r.data.tags["row"]: r for r in _kind(runs, "row")}
    assert set(rows) == {"test_panet", "all_background"}
    table = tracked_grid["results"] / "view" / "report" / "table_miou.csv"
    with open(table) as handle:
        mean = {line["method"]: float(line["1-shot Mean mean"]) for line in csv.DictReader(handle)}
    for row, run in rows.items():
        assert run.data.metrics["miou"] == round(mean[row], 1), row  # as the tables print it
        assert run.info.end_time > run.info.start_time  # it spans its cells' runs
        assert run.info.run_name.endswith("· 1-shot")
        nested = [
            r
            for r in _kind(runs, "cell")
            if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
        ]
        assert len(nested) == 2, row  # its two folds
    grid_run = _kind(runs, "grid")[0]
    assert grid_run.data.tags["grid.folds"] == "0, 1"
    tags = tracked_grid["client"].get_experiment(tracked_grid["experiment"].experiment_id).tags
    board = json.loads(tags["mlflow.sharedViewState.leaderboard"])
    assert board["searchFilter"] == "tags.`fsbench.kind` = 'row'"
    assert board["orderByKey"] == "metrics.`miou`" and board["orderByAsc"] is False
    assert board["selectedColumns"][:4] == [
        "metrics.`miou`", "metrics.`miou_std`", "metrics.`fb_iou`", "metrics.`fb_iou_std`"
    ]  # fmt: skip
    assert {"metrics.`miou_fold0`", "metrics.`miou_fold1`"} <= set(board["selectedColumns"])
    by_method = json.loads(tags["mlflow.sharedViewState.by-method"])
    assert [k["groupByData"] for k in by_method["groupBy"]["groupByKeys"]] == ["display", "shot"]
    charts = json.loads(tags["mlflow.sharedViewState.charts"])
    first = charts["compareRunCharts"][0]
    assert (first["type"], first["metricKey"]) == ("BAR", "miou")  # no sweep: no parallel chart
    assert all(c["type"] != "PARALLEL" for c in charts["compareRunCharts"])
    assert charts["compareRunSections"][-1]["name"] == "System metrics"
    shown = tracked_grid["client"].search_runs(
        [tracked_grid["experiment"].experiment_id], charts["searchFilter"], max_results=100
    )
    assert {r.data.tags["fsbench.kind"] for r in shown} == {"row", "training"}
    last = max(r.info.end_time for r in _kind(runs, "cell"))
    assert grid_run.info.end_time == last  # it spans the grid, not the 7 ms of its creation
    assert all(r.data.tags["mlflow.parentRunId"] == grid_run.info.run_id for r in rows.values())


@pytest.mark.slow
def test_training_curves_reach_mlflow_live_on_ray(tracked_grid):
    trainings = _kind(tracked_grid["runs"], "training")
    assert len(trainings) == 2  # one model per fold
    history = tracked_grid["client"].get_metric_history(trainings[0].info.run_id, "train/total")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]
    cells = {r.info.run_id: r for r in _kind(tracked_grid["runs"], "cell")}
    grid_run = _kind(tracked_grid["runs"], "grid")[0]
    for training in trainings:  # described, with parameters, linked both ways with its cells
        tags = training.data.tags
        assert tags["mlflow.note.content"].startswith("**Training of")
        assert training.data.params["train.steps"] == "12" and "fold" in training.data.params
        assert tags["mlflow.parentRunId"] == grid_run.info.run_id
        served = tags["fsbench.cells"].split(",")
        linked = [
            r
            for r in cells.values()
            if r.data.tags.get("fsbench.training_run") == training.info.run_id
        ]
        assert served and sorted(r.data.tags["fsbench.cell_id"] for r in linked) == sorted(served)
    for training in trainings:
        client = tracked_grid["client"]
        rss = client.get_metric_history(training.info.run_id, "system/process_memory_rss_megabytes")
        assert rss and all(m.value > 50 for m in rss)


@pytest.mark.slow
def test_report_refreshes_the_grid_run_and_no_artifact_leaves_the_folder(tracked_grid, capsys):
    results = tracked_grid["results"]
    client, experiment = tracked_grid["client"], tracked_grid["experiment"]
    before = {r.info.run_id for r in _kind(client.search_runs([experiment.experiment_id]), "row")}
    assert main(["report", "view", "--results", str(results)]) == 0
    assert "refreshed the report and row runs" in capsys.readouterr().out
    after = {r.info.run_id for r in _kind(client.search_runs([experiment.experiment_id]), "row")}
    assert after and after == before  # the same row runs, updated in place
    from mlflow.entities import ViewType

    deleted = client.search_runs([experiment.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert not _kind(deleted, "row")  # nothing piles up
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        assert run.info.artifact_uri.startswith(results.as_uri()), run.info.artifact_uri


@pytest.mark.slow
def test_ui_prints_the_leaderboard_url_only_once_the_server_answers(tracked_grid, tmp_path):
    import shutil
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = tracked_grid["results"]
    server = subprocess.Popen(
        [sys.executable, "-m", "fsbench.benchmarks.cli.main", "ui", "--results", str(results),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().startswith("fsbench: starting the MLflow UI")
        line = server.stdout.readline()  # blocks until the URL line
        assert "open http://" in line
        assert "&viewStateShareKey=leaderboard" in line  # the leaderboard stored on the experiment
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            assert reply.status == 200  # answering when the URL was printed
    finally:
        server.terminate()
        server.wait(timeout=60)
    copy = tmp_path / "copied"
    shutil.copytree(results, copy)
    done = subprocess.run(
        [sys.executable, "-m", "fsbench.benchmarks.cli.main", "ui", "--results", str(copy),
         "--port", str(port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    said = [line for line in done.stderr.splitlines() if line.startswith("fsbench")]
    assert len(said) == 1 and "was copied or moved" in said[0]
    assert "fsbench sync --results" in said[0]
