"""Paper tables of a grid's results: rows × (shot, fold, Mean) as "mean ± std", bold best, in
Markdown, LaTeX (booktabs) and CSV, with published rows and the provenance note."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fsbench.benchmarks.metrics import METRICS
from fsbench.benchmarks.report.frame import _rows_in_grid_order, fold_label, fold_order
from fsbench.datasets.protocols import PROTOCOLS

MISSING = "–"
UNCHECKED = "*"  # a published value not yet checked against the paper (reported.yaml)
REPORTED = Path(__file__).parents[1] / "reported.yaml"  # published numbers, by protocol


def _spread(values: pd.Series) -> float:
    """Population std over seeds; NaN for a single seed (there is no spread to state)."""
    return values.std(ddof=0) if len(values) > 1 else np.nan


BEST_SEED_COLUMN = "Best seed‡"
BEST_SEED_NOTE = (
    "‡ Best seed: the fold mean of each fold's best test seed, as BAM's and HDMNet's "
    "Best_mIoU; it selects on the test set, so it is not an estimate of the method's accuracy "
    "(the other columns average the seeds)."
)


def paper_table(
    frame: pd.DataFrame, metric: str = "miou", rows=None, best_of_seeds: bool = False
) -> pd.DataFrame:
    """Rows = variants, columns = (shot, Fold-0…Fold-3, Mean); values (mean, std) over seeds.

    Returns a frame of [mean, std] pairs; the Mean column averages the folds per seed first, so
    its std is over seeds of the fold-mean (NaN when a fold is missing). `best_of_seeds` adds,
    per shot, the fold mean of each fold's best test seed (marked ‡: it selects on the test
    set)."""
    rows = rows or _rows_in_grid_order(frame)
    folds = fold_order(frame)
    columns, data = [], {}
    for shot in sorted(frame["shot"].unique()):
        part = frame[frame["shot"] == shot]
        for fold in folds:
            columns.append((f"{shot}-shot", fold_label(fold)))
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
                data[(row, (f"{shot}-shot", fold_label(fold)))] = (
                    (values.mean(), _spread(values)) if len(values) else (np.nan, np.nan)
                )
            per_seed = cells.pivot_table(index=unit, columns="fold", values=metric)
            complete = len(per_seed.columns) == len(folds) and len(per_seed)
            fold_means = per_seed.mean(axis=1) if complete else pd.Series(dtype=float)
            data[(row, (f"{shot}-shot", "Mean"))] = (
                (fold_means.mean(), _spread(fold_means)) if complete else (np.nan, np.nan)
            )
            if best_of_seeds:
                best = cells.groupby("fold")[metric].max() if unit == "seed" else pd.Series()
                data[(row, (f"{shot}-shot", BEST_SEED_COLUMN))] = (
                    (best.mean(), np.nan) if len(best) == len(folds) else (np.nan, np.nan)
                )
        if best_of_seeds:
            columns.append((f"{shot}-shot", BEST_SEED_COLUMN))
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
    # std NaN: a single seed, so no spread to state ("–", never a "± 0.0" that claims one)
    spread = ("–" if not latex else "--") if std != std else f"{std:.1f}"
    text = f"{mean:.1f} ± {spread}" if not latex else f"{mean:.1f} $\\pm$ {spread}"
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

    Unverified values carry an asterisk; rows are labelled by their source, with a dagger
    where the method was pretrained on data beyond ImageNet."""
    entries = yaml.safe_load(REPORTED.read_text()) or []
    datasets, protocols = set(frame["dataset"]), set(frame["protocol"])
    cross = frame["dataset"].nunique() > 1  # a cross-domain table: columns are test sets
    annotations, ways = set(frame["annotation"]), set(frame["way"])
    rows = {}
    for entry in entries:
        sets = entry.get("per_dataset")  # a cross-domain row: {shot: {test set: value}}
        if (
            entry["metric"] != metric
            or bool(sets) != cross
            or (sets and not set(next(iter(sets.values()))) & datasets)
            or (not sets and entry["dataset"] not in datasets)
            or entry["protocol"] not in protocols
            or ways != {1}
            or entry.get("annotation", "mask") not in annotations
        ):
            continue
        best = entry.get("seed_summary") == "best"
        name = entry["label"]
        if entry.get("pretraining"):  # data beyond ImageNet: † after the method's name (cost.py)
            name = name.replace(" (", "† (", 1) if " (" in name else f"{name}†"
        label = f"{name}{' (best test seed ‡)' if best else ''} [{entry['source']}]"
        cells = {}
        for shot, values in (sets or {}).items():  # its test sets; Mean over the grid's own
            mark = "" if entry.get("status") == "read" else UNCHECKED
            for name, value in values.items():
                cells[(f"{shot}-shot", name)] = f"{value:.1f}{mark}"
            if set(values) >= datasets:
                mean = float(np.mean([values[d] for d in datasets]))
                cells[(f"{shot}-shot", "Mean")] = f"{mean:.1f}{mark}"
        for shot, values in (entry.get("shots") or {}).items():
            dagger = {
                "mean": "" if values.get("mean_status") == "read" else UNCHECKED,
                "folds": "" if values.get("folds_status") == "read" else UNCHECKED,
            }
            column = (
                BEST_SEED_COLUMN
                if best and (f"{shot}-shot", BEST_SEED_COLUMN) in columns
                else "Mean"
            )
            mark = "‡" if best else ""
            cells[(f"{shot}-shot", column)] = f"{values['mean']:.1f}{dagger['mean']}{mark}"
            for fold, value in enumerate(values.get("folds", [])):
                cells[(f"{shot}-shot", f"Fold-{fold}")] = f"{value:.1f}{dagger['folds']}"
        rows[label] = [cells.get(c, MISSING) for c in columns]
    return pd.DataFrame.from_dict(rows, orient="index", columns=pd.MultiIndex.from_tuples(columns))


REPORTED_NOTE = (
    "Rows marked [source] are published numbers, not reproduced here; * = not yet "
    "checked against the paper; ‡ = the best of the test seeds (selects on the test set)."
)


def to_markdown(
    table: pd.DataFrame,
    footnote: str = "",
    reported: pd.DataFrame | None = None,
    display: dict | None = None,
) -> str:
    """The table as Markdown, rows by their display names (`display`: row → name)."""
    means, best = table["mean"], _best(table)
    display = display or {}
    header = ["Method"] + [f"{s} {f}" for s, f in means.columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [":-:"] * len(means.columns)) + "|",
    ]
    for row in means.index:
        name = markdown_text(display.get(row, row))
        lines.append("| " + " | ".join([name] + _row_cells(table, row, best, latex=False)) + " |")
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
            value = f"{mean:.1f}" + (  # a single seed has no spread: none is printed
                f"\\,{{\\scriptsize$\\pm${std:.1f}}}" if column[1] == "Mean" and std == std else ""
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


LATEX_ESCAPES = {
    "\\": "\\textbackslash{}",
    "{": "\\{",
    "}": "\\}",
    "$": "\\$",
    "^": "\\^{}",
    "~": "\\textasciitilde{}",
    "_": "\\_",
    "%": "\\%",
    "&": "\\&",
    "#": "\\#",
    "±": "$\\pm$",
    "α": "$\\alpha$",
    "λ": "$\\lambda$",
    "—": "---",
    "†": "$^\\dagger$",
    "‡": "$^\\ddagger$",
    "−": "$-$",
    "≤": "$\\le$",
    "Δ": "$\\Delta$",
    "–": "--",
}


def markdown_text(text: str) -> str:
    """A name as one Markdown table cell: HTML characters escaped, `|` and `*` backslashed, a
    newline a space (a name can neither close the row nor open markup)."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for special in "\\|*`":
        text = text.replace(special, "\\" + special)
    return text


def _latex_escape(text: str) -> str:
    """Every character LaTeX treats specially, in one pass (an escape is never escaped again)."""
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def to_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    flat = pd.DataFrame(index=table.index)
    for shot, fold in table["mean"].columns:
        flat[f"{shot} {fold} mean"] = table["mean"][(shot, fold)].round(3)
        flat[f"{shot} {fold} std"] = table["std"][(shot, fold)].round(3)
    return flat


def footnote(frame: pd.DataFrame) -> str:
    protocols = ", ".join(sorted(frame["protocol"].unique()))
    scored = set(frame.get("scored_under", frame["protocol"]))
    if scored != set(frame["protocol"]):
        order = [p for p in PROTOCOLS if p in scored] + sorted(scored - set(PROTOCOLS))
        protocols = f"{protocols} (training), scored under {', '.join(order)}"
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
