"""The whole path on a tiny grid: train, evaluate, results JSON, MLflow (sqlite), report, resume."""

import json

import yaml


def test_serial_grid_end_to_end_and_resume(cli_process, tmp_path, small_grid_dict):
    grid_file = tmp_path / "tiny.yaml"
    grid_file.write_text(yaml.safe_dump(small_grid_dict))
    results = tmp_path / "results"
    first = cli_process(["run", str(grid_file), "--serial", "--results", str(results)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted((results / "tiny" / "cells").glob("*.json"))
    assert len(cells) == 3
    record = json.loads(next(c for c in cells if "test_panet" in c.read_text()).read_text())
    assert record["config"]["method"] == "test_panet" and len(record["seeds"]) == 2
    assert record["train"]["curve"] and record["checkpoint"]
    assert (results / "tiny" / record["checkpoint"]).is_file()
    assert record["environment"]["versions"]["torch"]
    for seed in record["seeds"]:
        assert (results / "manifests" / f"{seed['manifest_fingerprint'][:16]}.json").is_file()
        assert seed["counts"]["episodes"] == 6  # 1-way: at most one stored class row each
        assert len(seed["counts"]["per_class_sparse"]) <= 6
    report = results / "tiny" / "report"
    table = (report / "table_miou.md").read_text()
    assert "test_panet" in table and "Fold-0" in table
    assert (report / "table_miou.tex").read_text().count("\\toprule") == 1
    # no PANet w/o PAR row in this grid: a per-fold figure, not a "PAR on vs off" one
    assert (report / "miou_per_fold.png").is_file() and (report / "miou_per_fold.pdf").is_file()
    assert not (report / "par_per_fold.png").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'cell'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    panet_run = next(r for r in runs if r.data.tags["method"] == "test_panet")
    assert panet_run.data.params["train.steps"] == "4"
    metrics = panet_run.data.metrics
    assert {"miou", "miou_std", "fb_iou", "train/total"} <= set(metrics)
    assert metrics["miou"] == round(100 * record["summary"]["miou_mean"], 1)  # percent, as printed
    assert not any(k.startswith(("iou/", "seed/")) for k in metrics)  # artifacts, not metrics
    assert "fsbench.cell_id" in panet_run.data.tags
    # real times: the run spans the cell's training and evaluation; curves at their wall clock
    info = panet_run.info
    assert info.end_time - info.start_time >= 1000 * record["timings"]["train_seconds"] - 50
    history = client.get_metric_history(panet_run.info.run_id, "train/total")
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and info.start_time <= stamps[0] <= stamps[-1] <= info.end_time
    assert panet_run.data.tags["mlflow.source.git.commit"] == record["environment"]["git_sha"]
    inputs = panet_run.inputs.dataset_inputs
    assert len(inputs) == 2 and {i.dataset.digest for i in inputs} == {
        s["manifest_fingerprint"][:16] for s in record["seeds"]
    }
    # the curve reached MLflow while the model trained: its own run, points as they were made
    (training,) = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'training'")
    live = client.get_metric_history(training.info.run_id, "train/total")
    assert training.info.status == "FINISHED" and [m.step for m in live] == [
        p["step"] for p in record["train"]["curve"]
    ]
    assert live[-1].timestamp <= panet_run.info.end_time
    # cell → invocation → the grid's one run, which holds the report
    invocation = client.get_run(panet_run.data.tags["mlflow.parentRunId"])
    grid_run = client.get_run(invocation.data.tags["mlflow.parentRunId"])
    assert grid_run.data.tags["fsbench.kind"] == "grid"
    report_files = {a.path for a in client.list_artifacts(grid_run.info.run_id, "report")}
    assert "report/table_miou.tex" in report_files
    artifacts = {a.path for a in client.list_artifacts(panet_run.info.run_id)}
    assert {"config.json", "episodes.csv", "qualitative.png"} <= artifacts

    before = {c.name: c.stat().st_mtime_ns for c in cells}
    second = cli_process(
        ["run", str(grid_file), "--serial", "--results", str(results), "--no-report"], tmp_path
    )
    assert second.returncode == 0 and "0 cells written, 3 already done" in second.stdout
    grids = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'grid'")
    assert len(grids) == 1  # one stable run per grid, whatever the number of invocations
    assert {c.name: c.stat().st_mtime_ns for c in cells} == before
    sync = cli_process(["sync", "tiny", "--results", str(results)], tmp_path)
    assert "pushed 0 of 3" in sync.stdout


def test_checkpoint_reproduces_saved_predictions_and_renders(
    cli_process, tmp_path, small_grid_dict
):
    from fsbench.benchmarks.cli.qualitative import render, saved_matches_checkpoint
    from fsbench.benchmarks.store.results import ResultStore

    grid_file = tmp_path / "tiny.yaml"
    grid_file.write_text(yaml.safe_dump(dict(small_grid_dict, methods=[{"name": "test_panet"}])))
    done = cli_process(
        [
            "run",
            str(grid_file),
            "--serial",
            "--no-tracking",
            "--no-report",
            "--results",
            str(tmp_path / "r"),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    store = ResultStore(tmp_path / "r", "tiny")
    (cell,) = store.load_cells()
    assert cell.checkpoint and cell.qualitative
    assert saved_matches_checkpoint(cell, store)
    figure = render(store.grid_dir, None, [0, 3])
    assert figure.name == f"qualitative_{cell.cell_id}.png" and figure.stat().st_size > 1000
    shown = cli_process(
        ["qualitative", "tiny", "--results", str(tmp_path / "r"), "--episodes", "99"], tmp_path
    )
    assert shown.returncode == 2 and "episode 99 is outside 0…5" in shown.stderr
