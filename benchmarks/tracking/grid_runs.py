"""The grid-level runs of a grid's experiment — the grid run's settings and note, one row run per
table row (the report's Mean column, in percent) with its cells nested under it — and the MLflow
entities of a cell run's params and inputs. Helpers of `Tracker` (tracker.py), called only while
MLflow is reachable; mlflow is imported inside them, as in tracker.py."""

from __future__ import annotations

import json
import time

from fsbench.benchmarks.tracking.cell_run import CELL_TAG, KIND_TAG, manifest_datasets


def log_rows(tracker, rows: list[dict]) -> None:
    """One row run per table row (replacing the previous report's), its cells re-parented
    under it."""
    from mlflow.entities import Metric, RunTag

    for old in tracker._search(f"tags.{KIND_TAG} = 'row'"):  # replaced by this report's
        tracker.client.delete_run(old.info.run_id)
    cell_runs = {
        run.data.tags[CELL_TAG]: run.info.run_id
        for run in tracker._search(f"tags.{KIND_TAG} = 'cell'")
    }
    now = int(time.time() * 1000)
    for row in rows:
        folds = ", ".join(str(f) for f in row["folds"])
        metrics = ", ".join(
            f"{k} {v:.1f}" for k, v in row["metrics"].items() if k in ("miou", "fb_iou")
        )
        note = (
            f"**{row['display']} · {row['shot']}-shot** (`{row['row']}`): the report's Mean "
            f"column — the mean over folds {folds} per seed, then mean ± std over "
            f"{row['spread']} ({metrics}; percent). Its {len(row['cells'])} cells are "
            "nested under this run; table_miou.md in the grid run holds the paper table."
        )
        tags = {
            KIND_TAG: "row",
            "row": row["row"],
            "display": row["display"],
            "shot": str(row["shot"]),
            "fsbench.spread": row["spread"],
            "mlflow.parentRunId": tracker._grid_run(),
            "mlflow.note.content": note,
        }
        run = tracker.client.create_run(
            tracker.experiment_id,
            start_time=now,
            run_name=f"{row['display']} · {row['shot']}-shot",
            tags=tags,
        )
        run_id = run.info.run_id
        tracker.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in row["metrics"].items()],
            # what the row's numbers depend on (input size, scoring, episodes × seeds, …)
            params=[_param(k, v) for k, v in sorted(row.get("depends_on", {}).items())],
            tags=[RunTag("fsbench.cells", ",".join(row["cells"])[:5000])],
        )
        tracker.client.set_terminated(run_id, "FINISHED", end_time=now)
        for cell_id in row["cells"]:
            if cell_id in cell_runs:
                tracker.client.set_tag(cell_runs[cell_id], "mlflow.parentRunId", run_id)


def describe_grid(tracker, grid) -> None:
    """The grid run's settings (tags `grid.*`, rewritten by each invocation) and its note."""
    settings = grid_settings(grid)
    run_id = tracker._grid_run()
    for key, value in settings.items():
        tracker.client.set_tag(run_id, f"grid.{key}", value)
    tracker.client.set_tag(
        run_id,
        "mlflow.note.content",
        f"**Grid {grid.name}**: "
        + "; ".join(f"{k} {v}" for k, v in settings.items())
        + ". One row run per method × shot holds the report's Mean column; expand "
        "it for its cells. The report (tables, figures) is under Artifacts › report.",
    )


def grid_settings(grid) -> dict[str, str]:
    """What a grid run shows of its grid: dataset, protocol, sizes, axes, methods, training."""
    train = grid.train
    return {
        "dataset": json.dumps(grid.dataset, sort_keys=True),
        "protocol": grid.protocol,
        **({"eval_protocols": ", ".join(grid.eval_protocols)} if grid.eval_protocols else {}),
        "input_size": str(grid.input_size or "protocol's"),
        "episodes": str(grid.episodes or "protocol's"),
        "seeds": ", ".join(map(str, grid.seeds)) if grid.seeds else "protocol's",
        "folds": ", ".join(map(str, grid.folds)),
        "ways": ", ".join(map(str, grid.ways)),
        "shots": ", ".join(map(str, grid.shots)),
        "methods": ", ".join(m.row() for m in grid.methods),
        "train": f"{train.steps} steps, lr {train.lr}, {train.lr_schedule} schedule",
    }


def _manifest_inputs(result, store) -> list:
    """Each seed's episode manifest as an MLflow dataset input (name, fingerprint, source)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", "evaluation")])
        for fields in manifest_datasets(result, store.manifests_dir)
    ]


def _param(key, value):
    from mlflow.entities import Param

    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return Param(key, text[:6000])
