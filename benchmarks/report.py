"""The report of a grid: paper tables (Markdown, LaTeX, CSV) and the `report` command that
writes them with the figures (figures.py) and comparisons (comparisons.py); imports neither torch
nor ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fsbench.benchmarks.cells import (  # noqa: F401 - the notebook API re-exports them
    RESULT_VERSION,
    _nanmean,
    _rows_in_grid_order,
    cell_problem,
    current_cells,
    display_name,
    load_cells,
    row_label,
    seed_frame,
    train_seed,
)
from fsbench.benchmarks.comparisons import statistics, statistics_markdown  # noqa: F401
from fsbench.benchmarks.figures import (  # noqa: F401
    alpha_figure,
    class_names,
    grouped_bars,
    per_class_figure,
    qualitative_figure,
    qualitative_strip,
    training_curves,
)
from fsbench.benchmarks.metrics import METRICS
from fsbench.core import FsbenchError

MISSING = "–"


def paper_table(frame: pd.DataFrame, metric: str = "miou", rows=None) -> pd.DataFrame:
    """Rows = variants, columns = (shot, Fold-0…Fold-3, Mean); values (mean, std) over seeds.

    Returns a frame of [mean, std] pairs; the Mean column averages the folds per seed first, so
    its std is over seeds of the fold-mean (NaN when a fold is missing)."""
    rows = rows or _rows_in_grid_order(frame)
    folds = sorted(frame["fold"].unique())
    columns, data = [], {}
    for shot in sorted(frame["shot"].unique()):
        part = frame[frame["shot"] == shot]
        for fold in folds:
            columns.append((f"{shot}-shot", f"Fold-{fold}"))
        columns.append((f"{shot}-shot", "Mean"))
        for row in rows:
            cells = part[part["row"] == row]
            # Several training seeds: the spread between trained models (each the mean over its
            # episode seeds); otherwise the spread over episode seeds of one model.
            unit = "train_seed" if cells["train_seed"].nunique() > 1 else "seed"
            if unit == "train_seed":
                cells = cells.groupby(["train_seed", "fold"], as_index=False)[metric].mean()
            for fold in folds:
                values = cells[cells["fold"] == fold][metric]
                data[(row, (f"{shot}-shot", f"Fold-{fold}"))] = (
                    (values.mean(), values.std(ddof=0)) if len(values) else (np.nan, np.nan)
                )
            per_seed = cells.pivot_table(index=unit, columns="fold", values=metric)
            complete = len(per_seed.columns) == len(folds) and len(per_seed)
            fold_means = per_seed.mean(axis=1) if complete else pd.Series(dtype=float)
            data[(row, (f"{shot}-shot", "Mean"))] = (
                (fold_means.mean(), fold_means.std(ddof=0)) if complete else (np.nan, np.nan)
            )
    index = pd.MultiIndex.from_tuples(columns)
    means = pd.DataFrame(
        [[data[(r, c)][0] for c in columns] for r in rows], index=rows, columns=index
    )
    stds = pd.DataFrame(
        [[data[(r, c)][1] for c in columns] for r in rows], index=rows, columns=index
    )
    table = pd.concat({"mean": means, "std": stds}, axis=1)
    table.attrs["metric"] = metric  # which way "best" is (bold)
    return table


def _cell_text(mean, std, bold, latex):
    if mean != mean:
        return MISSING
    text = f"{mean:.1f} ± {std:.1f}" if not latex else f"{mean:.1f} $\\pm$ {std:.1f}"
    if bold:
        return f"\\textbf{{{text}}}" if latex else f"**{text}**"
    return text


def _row_cells(table: pd.DataFrame, row: str, best: dict, latex: bool) -> list[str]:
    """A row's "mean ± std" cells, bold where the mean is its column's best (NaN never is)."""
    means, stds = table["mean"], table["std"]
    return [
        _cell_text(means.at[row, c], stds.at[row, c], means.at[row, c] == best[c], latex)
        for c in means.columns
    ]


def _best(table: pd.DataFrame) -> dict:
    """Each column's best mean: the highest, or the lowest for a lower-is-better metric."""
    means = table["mean"]
    metric = METRICS.get(table.attrs.get("metric", "miou"))
    if metric is not None and not metric.higher_is_better:
        return {c: means[c].min() for c in means.columns}
    return {c: means[c].max() for c in means.columns}


def reported_rows(frame: pd.DataFrame, metric: str, columns) -> pd.DataFrame:
    """Published numbers matching the frame's dataset/protocol/annotation, as table strings.

    Unverified values carry a dagger; rows are labelled by their source."""
    import yaml

    entries = yaml.safe_load((Path(__file__).parent / "reported.yaml").read_text()) or []
    datasets, protocols = set(frame["dataset"]), set(frame["protocol"])
    annotations, ways = set(frame["annotation"]), set(frame["way"])
    rows = {}
    for entry in entries:
        if (
            entry["metric"] != metric
            or entry["dataset"] not in datasets
            or entry["protocol"] not in protocols
            or ways != {1}
            or entry.get("annotation", "mask") not in annotations
        ):
            continue
        label = f"{entry['label']} [{entry['source']}]"
        cells = {}
        for shot, values in entry["shots"].items():
            dagger = {
                "mean": "" if values.get("mean_status") == "read" else "†",
                "folds": "" if values.get("folds_status") == "read" else "†",
            }
            cells[(f"{shot}-shot", "Mean")] = f"{values['mean']:.1f}{dagger['mean']}"
            for fold, value in enumerate(values.get("folds", [])):
                cells[(f"{shot}-shot", f"Fold-{fold}")] = f"{value:.1f}{dagger['folds']}"
        rows[label] = [cells.get(c, MISSING) for c in columns]
    return pd.DataFrame.from_dict(rows, orient="index", columns=pd.MultiIndex.from_tuples(columns))


REPORTED_NOTE = (
    "Rows marked [source] are published numbers, not reproduced here; † = not yet "
    "checked against the paper."
)


def to_markdown(
    table: pd.DataFrame, footnote: str = "", reported: pd.DataFrame | None = None
) -> str:
    means, best = table["mean"], _best(table)
    header = ["Method"] + [f"{s} {f}" for s, f in means.columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [":-:"] * len(means.columns)) + "|",
    ]
    for row in means.index:
        lines.append("| " + " | ".join([row] + _row_cells(table, row, best, latex=False)) + " |")
    if reported is not None and len(reported):
        for label, values in reported.iterrows():
            lines.append("| " + " | ".join([f"*{label}*"] + [str(v) for v in values]) + " |")
        footnote = f"{footnote} {REPORTED_NOTE}".strip()
    return "\n".join(lines) + (f"\n\n{footnote}\n" if footnote else "\n")


def to_latex(
    table: pd.DataFrame,
    footnote: str = "",
    caption: str = "",
    reported: pd.DataFrame | None = None,
    label: str = "",
    display: dict | None = None,
) -> str:
    """A booktabs table as papers print it: folds as means, "mean ± std" in the Mean columns,
    a \\cmidrule per shot, published rows below a rule, a short caption and a \\label, the
    provenance as a note under the table. Wider than a two-column venue's column (~240 pt):
    `table*`. Scaled to the line width only when wider than it (needs booktabs, graphicx)."""
    means, best = table["mean"], _best(table)
    display = display or {}
    shots = list(dict.fromkeys(s for s, _ in means.columns))
    spans = [sum(1 for s2, _ in means.columns if s2 == s) for s in shots]
    rows = [_latex_escape(display.get(r, r)) for r in means.index]
    body = []
    for row, text in zip(means.index, rows):
        cells = []
        for column in means.columns:
            mean, std = means.at[row, column], table["std"].at[row, column]
            if mean != mean:
                cells.append("--")
                continue
            value = f"{mean:.1f}" + (
                f"\\,{{\\scriptsize$\\pm${std:.1f}}}" if column[1] == "Mean" else ""
            )
            cells.append(f"\\textbf{{{value}}}" if mean == best[column] else value)
        body.append(text + " & " + " & ".join(cells) + " \\\\")
    if reported is not None and len(reported):
        body.append("\\midrule")
        sources = []
        for name, values in reported.iterrows():
            name, _, source = str(name).partition(" [")
            if source:
                sources.append(f"{name}: {source.rstrip(']')}")
            cells = [
                _latex_escape(str(v).split(" ±")[0]).replace("†", "$^\\dagger$") for v in values
            ]
            body.append("\\textit{" + _latex_escape(name) + "} & " + " & ".join(cells) + " \\\\")
        footnote = f"{footnote} {REPORTED_NOTE} Sources: {'; '.join(sources)}.".strip()
    # Width estimate in pt at \\small: 6 pt a character, 12 pt of column separation.
    first = max(len(r) for r in [*rows, "Method"]) * 5.5 + 12
    width = first + sum((4 if column[1] != "Mean" else 9) * 5.5 + 12 for column in means.columns)
    wide = width > 240
    environment = "table*" if wide else "table"
    spec = "l" + "".join("c" * n for n in spans)
    lines = [f"\\begin{{{environment}}}[t]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{_latex_escape(caption)}}}")
    if label:
        lines.append(f"\\label{{{label}}}")
    tabular = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    tabular.append(
        " & "
        + " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{s}}}" for s, n in zip(shots, spans))
        + " \\\\"
    )
    start, rules = 2, []
    for n in spans:
        rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    tabular.append(" ".join(rules))
    tabular.append(
        "Method & " + " & ".join(f.replace("Fold-", "Fold ") for _, f in means.columns) + " \\\\"
    )
    tabular.append("\\midrule")
    tabular += body
    tabular += ["\\bottomrule", "\\end{tabular}"]
    # Set in a box, scaled down to the line width only if wider than it (graphicx): fits a
    # one-column article, a two-column venue's column (`table`) or its page (`table*`).
    lines += [
        "\\ifdefined\\fsbenchtable\\else\\newsavebox{\\fsbenchtable}\\fi",
        "\\sbox{\\fsbenchtable}{%",
        *tabular,
        "}",
        "\\ifdim\\wd\\fsbenchtable>\\linewidth",
        "\\resizebox{\\linewidth}{!}{\\usebox{\\fsbenchtable}}%",
        "\\else\\usebox{\\fsbenchtable}\\fi",
    ]
    if footnote:
        lines.append(
            "\\par\\smallskip\\parbox{\\linewidth}{\\footnotesize " + _latex_escape(footnote) + "}"
        )
    lines.append(f"\\end{{{environment}}}")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", "\\textbackslash{}"),
        ("_", "\\_"),
        ("%", "\\%"),
        ("&", "\\&"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("α", "$\\alpha$"),
        ("λ", "$\\lambda$"),
        ("—", "---"),
        ("†", "$^\\dagger$"),
    ):
        text = text.replace(char, escaped)
    return text


def to_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    flat = pd.DataFrame(index=table.index)
    for shot, fold in table["mean"].columns:
        flat[f"{shot} {fold} mean"] = table["mean"][(shot, fold)].round(3)
        flat[f"{shot} {fold} std"] = table["std"][(shot, fold)].round(3)
    return flat


def footnote(frame: pd.DataFrame) -> str:
    protocols = ", ".join(sorted(frame["protocol"].unique()))
    episodes = ", ".join(str(e) for e in sorted(frame["episodes"].unique()))
    seeds = ", ".join(str(s) for s in sorted(frame["seed"].unique()))
    prints = frame.groupby(["shot", "fold"])["fingerprint"].agg(lambda s: "/".join(sorted(set(s))))
    manifest = "; ".join(f"{shot}-shot fold {fold}: {fp}" for (shot, fold), fp in prints.items())
    train_seeds = sorted({int(s) for s in frame["train_seed"].dropna().unique()})
    if len(train_seeds) > 1:
        spread = (
            f"mean ± population std over training seeds {', '.join(map(str, train_seeds))} "
            "(each model's value the mean over its episode seeds; rows with one model: over "
            "episode seeds)"
        )
    else:
        spread = "mean ± population std over episode seeds of one trained model"
    return (
        f"mIoU % ({spread}). Protocol: {protocols}; {episodes} episodes "
        f"per fold and seed; episode seeds {seeds}. Manifest fingerprints — {manifest}."
    )


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


def build_report(grid_dir: Path, n_boot: int = 1000) -> dict:
    """Write tables, statistics and figures under `<grid_dir>/report/`; returns their paths."""
    grid_dir = Path(grid_dir)
    rejected: dict[str, str] = {}
    cells, superseded = current_cells(load_cells(grid_dir, rejected))
    for name, problem in rejected.items():
        print(f"fsbench: report: left out cells/{name}: {problem}", file=sys.stderr)
    missing = missing_cells(grid_dir, {c["cell_id"] for c in cells})
    if missing:
        print(
            f"fsbench: report: {len(missing)} cells of the grid have no valid result: "
            + ", ".join(missing[:10])
            + (" …" if len(missing) > 10 else ""),
            file=sys.stderr,
        )
    if not cells:
        raise FsbenchError(f"{grid_dir}: no finished cells to report (run the grid first)")
    out = grid_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    frame = seed_frame(cells)
    note = footnote(frame)
    if superseded:
        note += (
            f" {len(superseded)} older cells with the same rows and settings were left out "
            f"(superseded: {', '.join(sorted(c['cell_id'] for c in superseded))})."
        )
    written: dict[str, list] = {"tables": [], "figures": []}
    displays = frame.groupby("row")["display"].first().to_dict()
    if rejected:
        written["rejected"] = [f"cells/{n}: {p}" for n, p in rejected.items()]
    if missing:
        written["missing"] = missing
    for metric in METRICS.values():  # one table per registered metric, in registration order
        label, name = metric.name, metric.label
        table = paper_table(frame, label)
        text_note = note.replace("mIoU %", f"{name} %")
        reported = reported_rows(frame, label, list(table["mean"].columns))
        (out / f"table_{label}.md").write_text(to_markdown(table, text_note, reported))
        (out / f"table_{label}.tex").write_text(
            to_latex(
                table,
                text_note,
                caption=f"{name} (%) on {grid_dir.name}: folds are means over episode seeds, "
                "Mean is mean ± std over episode seeds of the fold mean.",
                reported=reported,
                label=f"tab:{grid_dir.name}-{label}",
                display=displays,
            )
        )
        to_csv_frame(table).to_csv(out / f"table_{label}.csv")
        written["tables"] += [out / f"table_{label}.{s}" for s in ("md", "tex", "csv")]
    class_table = pd.DataFrame(
        {
            (row_label(c["config"]), c["config"]["shot"], c["config"]["fold"]): {
                int(k): np.nan if v is None else 100 * v
                for k, v in c["summary"]["class_iou_mean"].items()
            }
            for c in cells
        }
    ).T.sort_index()
    class_table = class_table[sorted(class_table.columns)]
    class_table.index.names = ["method", "shot", "fold"]
    class_table.columns.name = "class"
    class_table.to_csv(out / "table_class_iou.csv", float_format="%.2f")
    written["tables"].append(out / "table_class_iou.csv")
    stats = statistics(cells, n_boot, grid_plan(grid_dir).get("compare", ()))
    stats.to_csv(out / "statistics.csv", index=False, float_format="%.3f")
    (out / "statistics.md").write_text(statistics_markdown(stats))
    written["tables"] += [out / "statistics.csv", out / "statistics.md"]
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
    from fsbench.benchmarks.results import ResultStore

    store = ResultStore(grid_dir.parent, grid_dir.name)
    headline = next(iter(METRICS.values()))  # the first registered metric: mIoU
    sign = 1 if headline.higher_is_better else -1
    best = max(
        (c for c in cells if c.get("qualitative")),
        key=lambda c: sign * c["summary"][f"{headline.name}_mean"],
        default=None,
    )
    if best is not None:
        figure = qualitative_figure(best, store, out / "qualitative.png", max_episodes=3)
        if figure is not None:
            written["figures"].append(figure)
    return written


# -- notebook API ----------------------------------------------------------------------------
def grid_folder(grid: str | Path = "quickstart", results: str | Path | None = None) -> Path:
    folder = Path(grid)
    if folder.is_dir():
        return folder
    from fsbench.benchmarks.results import default_results_root

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
