"""The grid-level runs of a grid's experiment — the grid run's settings and note, one row run per
table row (the report's Mean column, in percent) with its cells nested under it — and the MLflow
entities of a cell run's params and inputs. Helpers of `Tracker` (tracker.py), called only while
MLflow is reachable; mlflow is imported inside them, as in tracker.py."""

from __future__ import annotations

import json
import time

from fsbench.benchmarks.tracking.cell_run import (
    CELL_TAG,
    KIND_TAG,
    SHOWN_DECIMALS,
    manifest_datasets,
)

ROW_KEY = "fsbench.row_key"  # a row run's identity across reports: "<row>|<shot>"
DECIMALS = SHOWN_DECIMALS  # the tables print percent with one decimal: what the UI shows


def log_rows(tracker, rows: list[dict]) -> None:
    """One row run per table row, its cells nested under it. A later report updates the same
    runs in place (same run ids: bookmarks, pins and compare links stay valid; nothing piles
    up as deleted runs); only a row that left the table has its run deleted. A row run spans
    its cells (start of the first, end of the last) and shows values rounded as the tables
    print them (the cell files and artifacts keep the exact ones)."""
    from mlflow.entities import Metric, RunTag

    existing = {}
    for run in tracker._search(f"tags.{KIND_TAG} = 'row'"):
        key = run.data.tags.get(ROW_KEY)
        if key is None or key in existing:  # a row run of an earlier fsbench: replaced once
            tracker.client.delete_run(run.info.run_id)
        else:
            existing[key] = run
    cell_runs = {
        run.data.tags[CELL_TAG]: run for run in tracker._search(f"tags.{KIND_TAG} = 'cell'")
    }
    swept = swept_kwargs(rows, cell_runs)
    now = int(time.time() * 1000)
    wanted = set()
    for row in rows:
        key = f"{row['row']}|{row['shot']}"
        wanted.add(key)
        nested = [cell_runs[c] for c in row["cells"] if c in cell_runs]
        start = min((r.info.start_time for r in nested if r.info.start_time), default=now)
        end = max((r.info.end_time for r in nested if r.info.end_time), default=now)
        tags = {
            KIND_TAG: "row",
            ROW_KEY: key,
            "row": row["row"],
            "display": row["display"],
            "shot": str(row["shot"]),
            "fsbench.spread": row["spread"],
            "mlflow.parentRunId": tracker._grid_run(),
            "mlflow.note.content": _row_note(row),
            "fsbench.cells": ",".join(row["cells"])[:5000],
        }
        if key in existing:
            run_id = existing[key].info.run_id
            tracker.client.update_run(run_id, name=f"{row['display']} · {row['shot']}-shot")
        else:
            run_id = tracker.client.create_run(
                tracker.experiment_id,
                start_time=start,
                run_name=f"{row['display']} · {row['shot']}-shot",
                tags=tags,
            ).info.run_id
        tracker.client.log_batch(
            run_id,
            metrics=[
                Metric(k, round(float(v), DECIMALS), now, 0) for k, v in row["metrics"].items()
            ],
            # what the row's numbers depend on (input size, scoring, episodes × seeds, …);
            # params are written once (MLflow refuses to change one), so only the new ones
            params=[
                _param(k, v)
                for k, v in sorted({**row.get("depends_on", {}), **swept.get(key, {})}.items())
                if key not in existing or k not in existing[key].data.params
            ],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        tracker.client.set_terminated(run_id, "FINISHED", end_time=max(end, start))
        for cell_id in row["cells"]:
            if cell_id in cell_runs:
                tracker.client.set_tag(cell_runs[cell_id].info.run_id, "mlflow.parentRunId", run_id)
    ends = [r.info.end_time for r in cell_runs.values() if r.info.end_time]
    if ends:  # the grid run spans from its first invocation to its last finished cell
        tracker.client.set_terminated(tracker._grid_run(), "FINISHED", end_time=max(ends))
    for key, run in existing.items():
        if key not in wanted:  # the row left the table (its method was removed from the grid)
            tracker.client.delete_run(run.info.run_id)
    store_views(tracker, rows, sorted({k for values in swept.values() for k in values}))


def swept_kwargs(rows: list[dict], cell_runs: dict) -> dict[str, dict]:
    """Row key → the numeric method keywords that differ between rows of one method (an α
    sweep's `alpha`), read off the rows' cell runs (`method_kwargs.<name>` params): the axes of
    the parallel-coordinates chart, logged as row-run params under their own names."""
    values: dict[str, dict] = {}
    for row in rows:
        runs = [cell_runs[c] for c in row["cells"] if c in cell_runs]
        if runs:
            params = runs[0].data.params
            method = runs[0].data.tags.get("method", "")
            values[f"{row['row']}|{row['shot']}"] = (
                method,
                {
                    k.split(".", 1)[1]: v
                    for k, v in params.items()
                    if k.startswith("method_kwargs.")
                },
            )
    axes = {}
    for key, (method, kwargs) in values.items():
        same = [other for m, other in values.values() if m == method]
        for name, value in kwargs.items():
            try:
                float(value)
            except ValueError:
                continue
            if len({o.get(name) for o in same}) > 1:
                axes.setdefault(key, {})[name] = value
    return axes


SHARED_VIEW = "mlflow.sharedViewState."  # MLflow's experiment tag of a shared runs view
LEADERBOARD, BY_METHOD, CHARTS = "leaderboard", "by-method", "charts"


def _section(name: str) -> dict:
    return {"uuid": f"fsbench-{name.lower().replace(' ', '-')}", "name": name, "display": True,
            "isReordered": False, "deleted": False, "isGenerated": False}  # fmt: skip


def _chart(kind: str, section: dict, title: str, **fields) -> dict:
    """A chart card of MLflow's chart view (its RunsChartsCardConfig fields, plain JSON)."""
    return {"uuid": f"fsbench-{title.lower().replace(' ', '-')}", "type": kind,
            "runsCountToCompare": 100, "metricSectionId": section["uuid"], "deleted": False,
            "isGenerated": False, "displayName": title, **fields}  # fmt: skip


def chart_preset(swept: list[str]) -> dict:
    """The chart view's cards and sections, in this order: a miou bar per row run; for a sweep
    a parallel-coordinates chart (swept keyword → miou); the training runs' like-for-like
    `train/segmentation` curve (a loss without PAR's term: the same quantity for every
    method); MLflow's generated sections (time, eval) after; system metrics last."""
    results, training = _section("Results"), _section("Training")
    # MLflow puts the cards it generates for the other metrics into the section of their
    # prefix (created at the end when missing): named here, before the system metrics
    generated = [_section(n) for n in ("Model metrics", "train", "eval", "time")]
    charts = [_chart("BAR", results, "mIoU (%) per row", metricKey="miou")]
    if swept:
        charts.append(_chart("PARALLEL", results, "Sweep: " + ", ".join(swept) + " → mIoU",
                             selectedParams=list(swept), selectedMetrics=["miou"],
                             showAllRuns=True))  # fmt: skip
    charts.append(_chart(
        "LINE", training, "train/segmentation", metricKey="train/segmentation",
        selectedMetricKeys=["train/segmentation"], lineSmoothness=0, xAxisScaleType="linear",
        scaleType="linear", range={}, xAxisKey="step", selectedXAxisMetricKey="",
        yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False, useGlobalXaxisKey=False,
        useGlobalLineSmoothing=True,
    ))  # fmt: skip
    return {
        "compareRunCharts": charts,
        "compareRunSections": [results, training, *generated, _section("System metrics")],
        "isAccordionReordered": True,  # (the sections stay in this order)
        "hideEmptyCharts": True,
    }


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column key (makeCanonicalSortKey)


def shared_views(rows: list[dict], swept: list[str] = ()) -> dict[str, dict]:
    """The runs views fsbench stores on a grid's experiment, as MLflow's UI reads a shared view
    (`?viewStateShareKey=<key>`): its search facets and table state, plain JSON.
    - leaderboard: the row runs alone, best mIoU first, columns miou, miou_std, fb_iou,
      fb_iou_std and the per-fold miou, names in full;
    - by-method: the cell runs grouped by method name and shot (group means), best first;
    - charts: the row and training runs, opened in the chart view (`&compareRunsMode=CHART`)
      on the preset of `chart_preset` (the leaderboard's chart view shows the same cards)."""
    folds = list(dict.fromkeys(f for row in rows for f in row["folds"]))  # fold0 … or test sets
    metrics = ["miou", "miou_std", "fb_iou", "fb_iou_std", *(f"miou_{f}" for f in folds)]
    columns = [_column("metrics", m) for m in metrics]
    common = {
        "orderByKey": _column("metrics", "miou"),
        "orderByAsc": False,
        "lifecycleFilter": "Active",
        "runListHidden": False,
        "viewMaximized": True,  # the table takes the page (no side panel over it)
        "isAccordionReordered": False,
    }
    attributes = [_column("attributes", a) for a in ("Run Name", "Created", "Duration")]
    charts = chart_preset(list(swept))
    return {
        LEADERBOARD: {
            **common,
            **charts,
            "searchFilter": f"tags.`{KIND_TAG}` = 'row'",
            "selectedColumns": columns,
            "columnOrder": [*attributes, *columns],  # miou first (not alphabetical)
            "groupBy": None,
        },
        BY_METHOD: {
            **common,
            "searchFilter": f"tags.`{KIND_TAG}` = 'cell'",
            "selectedColumns": [
                _column("tags", "shot"),
                _column("tags", "scored_under"),
                *columns[:4],
            ],
            "groupBy": {
                "aggregateFunction": "average",
                "groupByKeys": [
                    {"mode": "tag", "groupByData": "display"},
                    {"mode": "tag", "groupByData": "shot"},
                ],
            },
            "groupsExpanded": {},
        },
        CHARTS: {
            **common,
            **charts,
            # (MLflow's search has no IN for tags: the kinds that are neither rows nor trainings)
            "searchFilter": " AND ".join(
                f"tags.`{KIND_TAG}` != '{kind}'" for kind in ("cell", "invocation", "grid")
            ),
            "selectedColumns": columns[:4],
            "groupBy": None,
        },
    }


def store_views(tracker, rows: list[dict], swept: list[str] = ()) -> None:
    for key, view in shared_views(rows, swept).items():
        tracker.client.set_experiment_tag(
            tracker.experiment_id, SHARED_VIEW + key, json.dumps(view, separators=(",", ":"))
        )


def leaderboard_view(client, experiment_id) -> str | None:
    """LEADERBOARD when the experiment holds that shared view, else None (no report yet)."""
    if experiment_id is None:
        return None
    try:
        tags = client.get_experiment(experiment_id).tags
    except Exception:  # noqa: BLE001 - the plain filtered URL still works
        return None
    return LEADERBOARD if SHARED_VIEW + LEADERBOARD in tags else None


def _row_note(row: dict) -> str:
    folds = ", ".join(str(f).removeprefix("fold") for f in row["folds"])
    metrics = ", ".join(
        f"{k} {v:.1f}" for k, v in row["metrics"].items() if k in ("miou", "fb_iou")
    )
    return (
        f"**{row['display']} · {row['shot']}-shot** (`{row['row']}`): the report's Mean "
        f"column — the mean over folds {folds} per seed, then mean ± std over "
        f"{row['spread']} ({metrics}; percent, shown to {DECIMALS} decimal as the tables). Its "
        f"{len(row['cells'])} cells are nested under this run; table_miou.md in the grid run "
        "holds the paper table."
    )


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
