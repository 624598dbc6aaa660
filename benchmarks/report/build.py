"""The `report` command: the tables (tables.py), statistics (statistics.py) and figures
(figures.py) of a grid's valid, current cells (frame.py) under `<grid>/report/`; and the notebook
API over the same frame."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fsbench.benchmarks.metrics import METRICS
from fsbench.benchmarks.report.cost import (
    cost_markdown,
    cost_table,
    external_note,
    mark_displays,
)
from fsbench.benchmarks.report.figures import (
    alpha_figure,
    grouped_bars,
    per_class_figure,
    qualitative_figure,
    training_curves,
)
from fsbench.benchmarks.report.frame import (
    _rows_in_grid_order,
    current_cells,
    fold_label,
    fold_order,
    load_cells,
    row_label,
    seed_frame,
)
from fsbench.benchmarks.report.leakage import write_leakage
from fsbench.benchmarks.report.protocols import (
    depends_on_columns,
    depends_on_note,
    protocol_figure,
    protocol_frame,
    protocol_latex,
    protocol_markdown,
    spreads,
)
from fsbench.benchmarks.report.sensitivity import (
    sensitivity_csv,
    sensitivity_figure,
    sensitivity_frame,
    sensitivity_latex,
    sensitivity_markdown,
)
from fsbench.benchmarks.report.statistics import statistics, statistics_markdown
from fsbench.benchmarks.report.tables import (
    BEST_SEED_NOTE,
    footnote,
    paper_table,
    reported_rows,
    to_csv_frame,
    to_latex,
    to_markdown,
)
from fsbench.benchmarks.store.results import ResultStore, default_results_root
from fsbench.core import FsbenchError, atomic_write_text


# -- the report command ----------------------------------------------------------------------
def grid_plan(grid_dir: Path) -> dict:
    """The grid's last run's plan.json (cells, compare pairs); {} when absent or damaged."""
    try:
        plan = json.loads((Path(grid_dir) / "plan.json").read_text())
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) else {}


def missing_cells(grid_dir: Path, present: set[str]) -> list[str]:
    """Titles (and ids) of the cells of the grid's last run (its plan.json) lacking a result."""
    try:
        plan = json.loads((Path(grid_dir) / "plan.json").read_text())
        return [f"{c['title']} ({c['id']})" for c in plan["cells"] if c["id"] not in present]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no plan written (older results): nothing to compare with


def row_summaries(frame: pd.DataFrame) -> list[dict]:
    """One entry per table row and shot — what the report's Mean column says, in percent (as
    the frame is) — for the MLflow row runs: {row, display, shot, metrics {miou, miou_std, …,
    miou_fold<f>}, cells (ids), folds, spread (what ± spans)}."""
    tables = {name: paper_table(frame, name) for name in METRICS if name in frame}
    summaries = []
    for shot in sorted(frame["shot"].unique()):
        part = frame[frame["shot"] == shot]
        for row in _rows_in_grid_order(part):
            cells = part[part["row"] == row]
            metrics = {}
            for name, table in tables.items():
                mean, std = (table[k].loc[row, (f"{shot}-shot", "Mean")] for k in ("mean", "std"))
                if not np.isnan(mean):
                    metrics[name], metrics[f"{name}_std"] = mean, std
                for fold in fold_order(cells):
                    value = table["mean"].loc[row, (f"{shot}-shot", fold_label(fold))]
                    if name == "miou" and not np.isnan(value):
                        metrics[f"miou_{fold_label(fold, 'fold')}"] = value
            replicated = cells["train_seed"].nunique() > 1
            summaries.append(
                {
                    "row": row,
                    "display": cells["display"].iloc[0],
                    "shot": int(shot),
                    "metrics": metrics,
                    "cells": sorted(cells["cell_id"].unique()),
                    "folds": [fold_label(f, "fold") for f in fold_order(cells)],
                    "spread": "training seeds" if replicated else "episode seeds",
                }
            )
    return summaries


def build_report(grid_dir: Path, n_boot: int = 1000) -> dict:
    """Write tables, statistics and figures under `<grid_dir>/report/`; returns their paths.
    Writes nothing outside the grid's folder (a `report` that links elsewhere is refused), and a
    folder it may not write is one line."""
    grid_dir = Path(grid_dir)
    out = grid_dir / "report"
    if out.is_symlink() or (out.exists() and not out.resolve().is_relative_to(grid_dir.resolve())):
        raise FsbenchError(
            f"{out} is a link to {out.resolve()}, outside the results folder; fsbench writes "
            "reports only inside it — remove the link and rerun `fsbench report`"
        )
    try:
        return _build_report(grid_dir, out, n_boot)
    except OSError as error:
        where = error.filename or out
        raise FsbenchError(
            f"cannot write the report: {where}: {error.strerror or error}; make {out} writable "
            "(the cell results are untouched) and rerun `fsbench report`"
        ) from None


def _build_report(grid_dir: Path, out: Path, n_boot: int) -> dict:
    rejected: dict[str, str] = {}
    cells, superseded = current_cells(load_cells(grid_dir, rejected))
    scored_other_way = [c for c in cells if c.config.score_resolution]  # sensitivity copies
    every_cell, cells = cells, [c for c in cells if not c.config.score_resolution]
    for name, problem in rejected.items():
        print(f"fsbench: report: left out cells/{name}: {problem}", file=sys.stderr)
    missing = missing_cells(grid_dir, {c.cell_id for c in every_cell})
    if missing:
        print(
            f"fsbench: report: {len(missing)} cells of the grid have no valid result: "
            + ", ".join(missing[:10])
            + (" …" if len(missing) > 10 else ""),
            file=sys.stderr,
        )
    if not cells:
        raise FsbenchError(f"{grid_dir}: no finished cells to report (run the grid first)")
    out.mkdir(parents=True, exist_ok=True)
    frame = seed_frame(cells)
    provenance = depends_on_note(cells)
    note = f"{footnote(frame)} {provenance}"
    if superseded:
        note += (
            f" {len(superseded)} older cells with the same rows and settings were left out "
            f"(superseded: {', '.join(sorted(c.cell_id for c in superseded))})."
        )
    written: dict[str, list] = {"tables": [], "figures": []}
    displays = frame.groupby("row")["display"].first().to_dict()
    external = external_note(frame, displays)
    if external:
        note = f"{note} {external}"
    displays = mark_displays(displays, frame)
    replicated = frame.groupby("row")["train_seed"].nunique().max() > 1
    spread = "training seeds (each a mean over episode seeds)" if replicated else "episode seeds"
    if rejected:
        written["rejected"] = [f"cells/{n}: {p}" for n, p in rejected.items()]
    if missing:
        written["missing"] = missing
    plan = grid_plan(grid_dir)  # the grid's declared comparisons and seed summary
    best_seeds = plan.get("seed_summary") == "best"
    for metric in METRICS.values():  # one table per registered metric, in registration order
        label, name = metric.name, metric.label
        table = paper_table(frame, label, best_of_seeds=best_seeds)
        text_note = note.replace("mIoU %", f"{name} %")
        if best_seeds:
            text_note = f"{text_note} {BEST_SEED_NOTE}"
        reported = reported_rows(frame, label, list(table["mean"].columns))
        atomic_write_text(
            out / f"table_{label}.md", to_markdown(table, text_note, reported, displays)
        )
        atomic_write_text(
            out / f"table_{label}.tex",
            to_latex(
                table,
                text_note,
                caption=f"{name} (%) on {grid_dir.name}: folds are means over episode seeds, "
                f"Mean is mean ± std over {spread} of the fold mean.",
                reported=reported,
                label=f"tab:{grid_dir.name}-{label}",
                display=displays,
            ),
        )
        csv = to_csv_frame(table).join(depends_on_columns(cells))  # each row's provenance
        atomic_write_text(out / f"table_{label}.csv", csv.to_csv(index_label="method"))
        written["tables"] += [out / f"table_{label}.{s}" for s in ("md", "tex", "csv")]
    cost = cost_table(frame, displays)
    atomic_write_text(out / "table_cost.md", cost_markdown(cost))
    atomic_write_text(out / "table_cost.csv", cost.to_csv(index=False))
    written["tables"] += [out / "table_cost.md", out / "table_cost.csv"]
    class_table = pd.DataFrame(
        {
            (row_label(c.config), c.config.shot, c.config.fold): {
                int(k): np.nan if v is None else 100 * v
                for k, v in c.summary["class_iou_mean"].items()
            }
            for c in cells
        }
    ).T.sort_index()
    class_table = class_table[sorted(class_table.columns)]
    class_table.index.names = ["method", "shot", "fold"]
    class_table.columns.name = "class"
    atomic_write_text(
        out / "table_class_iou.csv",
        class_table.to_csv(
            float_format="%.2f",
            index_label=None if any(class_table.index.names) else "method",  # never blank
        ),
    )
    written["tables"].append(out / "table_class_iou.csv")
    stats = statistics(cells, n_boot, plan.get("compare", ()))
    atomic_write_text(out / "statistics.csv", stats.to_csv(index=False, float_format="%.3f"))
    atomic_write_text(out / "statistics.md", statistics_markdown(stats))
    written["tables"] += [out / "statistics.csv", out / "statistics.md"]
    written["tables"] += write_leakage(cells, out)
    for path in _protocol_report(cells, out, grid_dir.name, provenance, n_boot):
        written["tables" if path.suffix in (".md", ".tex", ".csv") else "figures"].append(path)
    for path in _sensitivity_report(every_cell, out, n_boot) if scored_other_way else []:
        written["tables" if path.suffix in (".md", ".tex", ".csv") else "figures"].append(path)
    rows = _rows_in_grid_order(frame)
    methods = frame.groupby("row")["method"].first().str.removeprefix("test_")
    with_par = [r for r in rows if methods[r] == "panet"]
    without_par = [r for r in rows if methods[r] == "panet_nopar"]
    if with_par and without_par:  # the ablation exists in this grid
        written["figures"] += grouped_bars(
            frame,
            out,
            "par_per_fold",
            with_par + without_par,
            "PAR on vs off, per fold (mean ± std over episode seeds)",
        )
    else:
        written["figures"] += grouped_bars(
            frame, out, "miou_per_fold", rows, "mIoU per fold (mean ± std over episode seeds)"
        )
    written["figures"] += grouped_bars(
        frame,
        out,
        "shots",
        rows,
        "1-shot vs 5-shot (mean ± std over folds and episode seeds)",
        group="shot",
        panel=None,
    )
    written["figures"] += per_class_figure(cells, out)
    written["figures"] += training_curves(cells, out)
    written["figures"] += alpha_figure(frame, out)
    store = ResultStore(grid_dir.parent, grid_dir.name)
    headline = next(iter(METRICS.values()))  # the first registered metric: mIoU
    sign = 1 if headline.higher_is_better else -1
    best = max(
        (c for c in cells if c.qualitative),
        key=lambda c: sign * c.mean(headline.name),
        default=None,
    )
    if best is not None:
        figure = qualitative_figure(best, store, out / "qualitative.png", max_episodes=3)
        if figure is not None:
            written["figures"].append(figure)
    written["rows"] = row_summaries(frame)
    columns = depends_on_columns(cells)
    for row in written["rows"]:  # the row runs' params in MLflow
        row["depends_on"] = columns.loc[row["row"]].to_dict() if row["row"] in columns.index else {}
    return written


def _sensitivity_report(cells, out: Path, n_boot: int) -> list:
    """sensitivity.md/.tex/.csv and its figure (`sensitivity: true`)."""
    frame = sensitivity_frame(cells, n_boot)
    if frame.empty:
        return []
    atomic_write_text(out / "sensitivity.md", sensitivity_markdown(frame))
    atomic_write_text(out / "sensitivity.tex", sensitivity_latex(frame))
    csv = sensitivity_csv(frame).to_csv(index=False, float_format="%.3f")
    atomic_write_text(out / "sensitivity.csv", csv)
    tables = [out / f"sensitivity.{suffix}" for suffix in ("md", "tex", "csv")]
    return tables + sensitivity_figure(frame, out)


def _protocol_report(cells, out: Path, grid: str, provenance: str, n_boot: int) -> list:
    """protocols.md/.tex/.csv and the protocols figure when the grid scores its models under
    several protocols (`eval_protocols`); [] otherwise."""
    frame = protocol_frame(cells, n_boot)
    if frame.empty:
        return []
    atomic_write_text(out / "protocols.md", protocol_markdown(frame, provenance))
    caption = (
        f"{grid}: each model under each protocol (fold mean, ± half the 95% bootstrap CI); "
        "Spread: largest minus smallest over protocols."
    )
    atomic_write_text(out / "protocols.tex", protocol_latex(frame, caption, provenance))
    spread = spreads(frame)[["row", "shot", *[f"{m}_spread" for m in METRICS]]]
    table = frame.drop(columns=["order", "protocol_order"]).merge(spread, on=["row", "shot"])
    atomic_write_text(out / "protocols.csv", table.to_csv(index=False, float_format="%.3f"))
    tables = [out / f"protocols.{suffix}" for suffix in ("md", "tex", "csv")]
    return tables + protocol_figure(frame, out)


# -- notebook API ----------------------------------------------------------------------------
def grid_folder(grid: str | Path = "quickstart", results: str | Path | None = None) -> Path:
    folder = Path(grid)
    if folder.is_dir():
        return folder
    folder = (Path(results) if results else default_results_root()) / str(grid)
    if not folder.is_dir():
        raise FsbenchError(f"{folder}: no results for grid {grid!r} (run it first)")
    return folder


def results_frame(
    grid: str | Path = "quickstart", results: str | Path | None = None
) -> pd.DataFrame:
    """One row per (cell, seed) of a grid's current results (superseded cells left out)."""
    return seed_frame(current_cells(load_cells(grid_folder(grid, results)))[0])


def results_table(
    grid: str | Path = "quickstart", metric: str = "miou", results: str | Path | None = None
) -> pd.DataFrame:
    """The paper-layout table (columns `mean` and `std` × (shot, fold)) as a DataFrame."""
    return paper_table(results_frame(grid, results), metric)
