"""Tables and figures from `results/<grid>/cells/*.json` (imports neither torch nor ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fsbench.benchmarks.metrics import (
    EpisodeCounts,
    _boot_stat,
    _resample_weights,
    bootstrap_ci,
)
from fsbench.datasets.protocols import get_protocol
from fsbench.datasets.registry import FsbenchError

MISSING = "–"


RESULT_VERSION = 1  # results.RESULT_VERSION (not imported: it would pull in the runner's deps)


def load_cells(grid_dir: Path, rejected: dict | None = None) -> list[dict]:
    """The grid folder's valid cell files; each rejected one is put in `rejected` (file name →
    why): a report shows only what its grid computed, as the run wrote it."""
    grid_dir = Path(grid_dir)
    cells = []
    for path in sorted(Path(grid_dir, "cells").glob("*.json")):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            problem = f"unreadable ({type(error).__name__}: a truncated or damaged file?)"
        else:
            problem = cell_problem(raw, path.stem, grid_dir.name)
        if problem is None:
            cells.append(raw)
        elif rejected is not None:
            rejected[path.name] = problem
    return cells


def cell_problem(raw, file_id: str, grid: str) -> str | None:
    """Why a cell record must not be reported (None: it is valid): wrong version, an id that is
    not its file's name (a copy), another grid's cell, missing fields, or numbers that its own
    per-episode counts do not give (an edited file)."""
    if not isinstance(raw, dict):
        return f"not a cell record (a JSON {type(raw).__name__}, not an object)"
    if raw.get("version") != RESULT_VERSION:
        return f"result version {raw.get('version')!r}, expected {RESULT_VERSION}"
    if raw.get("cell_id") != file_id:
        return f"its cell_id {raw.get('cell_id')!r} is not its file name (a copy?)"
    if raw.get("grid") != grid:
        return f"a cell of grid {raw.get('grid')!r}, not of {grid!r}"
    try:
        config = raw["config"]
        for key in ("row", "method", "dataset", "fold", "way", "shot", "protocol"):
            config[key]
        if not raw["seeds"]:
            return "no seed results"
        for seed in raw["seeds"]:
            counts = EpisodeCounts.from_json(seed["counts"])
            for metric, value in (("miou", counts.miou()), ("fb_iou", counts.fb_iou())):
                if not np.isclose(seed[metric], value, rtol=0, atol=1e-9):
                    return (
                        f"seed {seed['seed']}: {metric} {seed[metric]} is not what its "
                        f"per-episode counts give ({value:.6f}); edited?"
                    )
        mean = float(np.mean([s["miou"] for s in raw["seeds"]]))
        if not np.isclose(raw["summary"]["miou_mean"], mean, rtol=0, atol=1e-9):
            return "its summary mIoU is not the mean of its seeds; edited?"
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        return f"incomplete record ({type(error).__name__}: {error})"
    return None


def current_cells(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """Cells that one table cell would mix (same row label and setting, different configs, e.g.
    after a grid edit): keep the newest of each, and return the superseded ones apart."""
    newest: dict[tuple, dict] = {}
    for cell in sorted(cells, key=lambda c: c.get("finished_at", "")):
        c = cell["config"]
        key = (
            row_label(c),
            c["dataset"]["name"],
            c["fold"],
            c["way"],
            c["shot"],
            c["protocol"],
            train_seed(c),
        )
        newest[key] = cell
    kept = list(newest.values())
    ids = {c["cell_id"] for c in kept}
    return kept, [c for c in cells if c["cell_id"] not in ids]


def row_label(config: dict) -> str:
    """The table row of a cell: its variant, plus way and annotation where they are not 1/mask."""
    label = config["row"]
    if config.get("way", 1) != 1:
        label += f" {config['way']}-way"
    if config.get("annotation", "mask") != "mask":
        label += f" ({config['annotation']})"
    return label


# How papers name the bundled methods (a grid's `display:` overrides, per method entry).
DISPLAY_NAMES = {
    "panet": "PANet",
    "panet_nopar": "PANet w/o PAR",
    "prototype_notrain": "PANet, untrained",
    "sgone": "SG-One",
    "canet": "CANet",
    "finetune_linear": "Linear probe",
    "all_background": "All background",
    "all_foreground": "All foreground",
}
GREEK = {"alpha": "α", "par_weight": "λ"}


def display_name(cell: dict) -> str:
    """The name a paper prints for a cell's row: the grid's `display:`, else the method's
    usual name with its swept values, way and annotation."""
    config = cell["config"]
    name = cell.get("display")
    if not name:
        method, label = config["method"], config["row"]
        name = DISPLAY_NAMES.get(method, method)
        if label.startswith(f"{method}[") and label.endswith("]"):
            values = label[len(method) + 1 : -1].split(",")
            swept = ", ".join(
                GREEK.get(k, k) + "=" + v for k, _, v in (x.partition("=") for x in values)
            )
            name = f"{name} ({swept})"
        elif label != method:
            name = label  # the grid's own label
    if config.get("way", 1) != 1:
        name += f", {config['way']}-way"
    if config.get("annotation", "mask") != "mask":
        name += f" ({config['annotation']})"
    return name


def train_seed(config: dict):
    """The training seed of a trained cell (None for methods that do not train)."""
    return (config.get("train") or {}).get("seed")


def seed_frame(cells: list[dict]) -> pd.DataFrame:
    """One row per (cell, seed): the tidy data every table and figure is computed from."""
    rows = []
    for cell in cells:
        config = cell["config"]
        for seed in cell["seeds"]:
            rows.append(
                {
                    "row": row_label(config),
                    "display": display_name(cell),
                    "method": config["method"],
                    "dataset": config["dataset"]["name"],
                    "fold": config["fold"],
                    "way": config["way"],
                    "shot": config["shot"],
                    "annotation": config["annotation"],
                    "protocol": config["protocol"],
                    "alpha": config["method_kwargs"].get("alpha"),
                    "seed": seed["seed"],
                    "train_seed": train_seed(config),
                    "miou": 100 * seed["miou"],
                    "fb_iou": 100 * seed["fb_iou"],
                    "episodes": seed["episodes"],
                    "fingerprint": seed["manifest_fingerprint"][:12],
                    "cell_id": cell["cell_id"],
                    "row_index": cell.get("row_index", 0),
                }
            )
    return pd.DataFrame(rows)


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
    return pd.concat({"mean": means, "std": stds}, axis=1)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def _rows_in_grid_order(frame: pd.DataFrame) -> list[str]:
    order = frame.groupby("row")["row_index"].min().sort_values(kind="stable")
    return list(order.index)


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
    means = table["mean"]
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


def statistics(cells: list[dict], n_boot: int = 1000, compare=()) -> pd.DataFrame:
    """Per cell and seed: the 95% bootstrap CI of its mIoU. Per declared pair (variant, base),
    per shot: the paired difference per fold and of the fold mean (the number a paper reports),
    by a paired bootstrap over episodes (both rows resampled alike, on the same manifests;
    training-seed replicates paired by seed), with Holm-corrected p-values over all of them."""
    rows = []
    by_setting: dict = {}  # (row, fold, way, shot, annotation) → {train seed: {seed: counts}}
    for cell in cells:
        config = cell["config"]
        for seed in cell["seeds"]:
            counts = EpisodeCounts.from_json(seed["counts"])
            low, high = bootstrap_ci(counts, n_boot=n_boot, seed=seed["seed"])
            rows.append(
                {
                    "kind": "ci",
                    "row": row_label(config),
                    "fold": config["fold"],
                    "shot": config["shot"],
                    "seed": seed["seed"],
                    "value": 100 * counts.miou(),
                    "low": 100 * low,
                    "high": 100 * high,
                    "versus": "",
                    "p": np.nan,
                    "p_holm": np.nan,
                    "significant": "",
                }
            )
            key = (config["row"], config["fold"], config["way"], config["shot"])
            key += (config["annotation"],)
            by_setting.setdefault(key, {}).setdefault(train_seed(config), {})[seed["seed"]] = (
                counts,
                seed["manifest_fingerprint"],
            )
    tests = []
    settings = sorted({k[1:] for k in by_setting}, key=str)
    for variant, base in compare:
        for way, shot, annotation in sorted({(w, s, a) for _, w, s, a in settings}):
            folds = sorted({f for f, w, s, a in settings if (w, s, a) == (way, shot, annotation)})
            draws = {}
            for fold in folds:
                pairs = _paired_draws(
                    by_setting.get((variant, fold, way, shot, annotation), {}),
                    by_setting.get((base, fold, way, shot, annotation), {}),
                    n_boot,
                    fold,
                )
                if pairs is not None:
                    draws[fold] = pairs
                    tests.append((variant, base, shot, fold, *pairs))
            if draws and len(draws) == len(folds):  # the fold mean needs every fold
                observed = float(np.mean([d[0] for d in draws.values()]))
                replicates = np.mean([d[1] for d in draws.values()], axis=0)
                tests.append((variant, base, shot, "Mean", observed, replicates))
    adjusted = _holm([_bootstrap_p(t[5]) for t in tests])
    for (variant, base, shot, fold, observed, replicates), (p, p_holm) in zip(tests, adjusted):
        low, high = np.nanpercentile(replicates, [2.5, 97.5])
        rows.append(
            {
                "kind": "paired",
                "row": variant,
                "fold": fold,
                "shot": shot,
                "seed": "all",
                "value": 100 * observed,
                "low": 100 * low,
                "high": 100 * high,
                "versus": base,
                "p": p,
                "p_holm": p_holm,
                "significant": "yes" if p_holm < 0.05 else "no",
            }
        )
    return pd.DataFrame(rows)


def _paired_draws(variant: dict, base: dict, n_boot: int, fold: int):
    """(observed, bootstrap replicates) of variant − base mIoU at one fold: the mean over the
    training seeds both have (an untrained base serves every seed) and their shared episode
    seeds, episodes resampled alike for both rows. None when nothing pairs."""
    observed, replicates = [], []
    for seed, runs in sorted(variant.items(), key=str):
        other = base.get(seed, base.get(None)) if len(base) > 1 else next(iter(base.values()), None)
        if other is None:
            continue
        for episode_seed, (counts, fingerprint) in sorted(runs.items()):
            if episode_seed not in other or other[episode_seed][1] != fingerprint:
                continue
            base_counts = other[episode_seed][0]
            weights = _resample_weights(len(counts.per_class), n_boot, 1000 * fold + episode_seed)
            observed.append(counts.miou() - base_counts.miou())
            replicates.append(
                _boot_stat(counts, weights, "miou") - _boot_stat(base_counts, weights, "miou")
            )
    if not observed:
        return None
    return float(np.mean(observed)), np.mean(replicates, axis=0)


def _bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller tail beyond 0."""
    replicates = replicates[np.isfinite(replicates)]
    if not len(replicates):
        return 1.0
    tail = min((replicates <= 0).mean(), (replicates >= 0).mean())
    return float(min(1.0, 2 * max(tail, 1 / len(replicates))))


def _holm(pvalues: list[float]) -> list[tuple[float, float]]:
    """(p, Holm-adjusted p) for each test: step-down over all the comparisons of the report."""
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = np.empty(len(pvalues)), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return list(zip(pvalues, adjusted.tolist()))


def statistics_markdown(stats: pd.DataFrame) -> str:
    """The declared comparisons: Δ mIoU per fold and of the fold mean, paired bootstrap CIs,
    Holm-corrected p-values; the per-cell CIs stay in the CSV."""
    lines = [
        "# Paired comparisons (same manifests; 95% paired bootstrap over episodes; "
        "p-values Holm-corrected over every comparison below)",
        "",
    ]
    paired = stats[stats["kind"] == "paired"] if len(stats) else stats
    if not len(paired):
        return "\n".join(
            lines
            + [
                "No comparison declared: add `compare: [[variant, base]]` (rows of the grid) to "
                "the grid file.",
                "",
            ]
        )
    lines += [
        "| Variant | vs | Shot | Fold | Δ mIoU | 95% CI | p | p (Holm) | Significant |",
        "|---|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|",
    ]
    for _, r in paired.iterrows():
        fold = "**mean**" if r["fold"] == "Mean" else r["fold"]
        lines.append(
            f"| {r['row']} | {r['versus']} | {r['shot']} | {fold} | {r['value']:+.1f} | "
            f"[{r['low']:+.1f}, {r['high']:+.1f}] | {r['p']:.3f} | {r['p_holm']:.3f} | "
            f"{r['significant']} |"
        )
    lines += [
        "",
        f"{(paired['significant'] == 'yes').sum()} of {len(paired)} differences are significant "
        "at 5% after Holm's correction. The intervals resample episodes: with several "
        "`train_seeds` they pair models seed by seed but do not resample the training runs.",
        "",
    ]
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------
def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 120,
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            # TrueType (Type 42) fonts in PDF/PS: venues' checkers reject Type 3
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
        }
    )
    return plt


HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
GREYS = ["0.15", "0.45", "0.7", "0.85", "0.3", "0.55", "0.9", "0.05"]


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for suffix in ("png", "pdf"):
        path = out_dir / f"{name}.{suffix}"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _bars(ax, groups, rows, means, errors, labels):
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar(
            np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width,
            means[i],
            width,
            yerr=errors[i] if errors is not None else None,
            capsize=2,
            label=row,
            color=GREYS[i % len(GREYS)],
            hatch=HATCHES[i % len(HATCHES)],
            edgecolor="black",
            linewidth=0.6,
        )
    ax.set_xticks(np.arange(len(groups)), labels)


def grouped_bars(frame, out_dir, name, rows, title, group="fold", metric="miou", panel="shot"):
    """Bars of mean ± std over seeds per `group` for each row, one panel per `panel` value.

    Greyscale-safe (grey levels plus hatching); seeds are never pooled across panels."""
    plt = _style()
    part = frame[frame["row"].isin(rows)]
    if part.empty:
        return []
    keys = ["row", group] + ([panel] if panel else [])
    stats = part.groupby(keys)[metric].agg(["mean", lambda s: s.std(ddof=0)])
    stats.columns = ["mean", "std"]
    groups = sorted(part[group].unique())
    panels = sorted(part[panel].unique()) if panel else [None]
    fig, axes = plt.subplots(
        1,
        len(panels),
        squeeze=False,
        sharey=True,
        figsize=(0.6 + len(panels) * (0.5 + 0.35 * len(groups) * len(rows)), 3),
    )
    names = part.groupby("row")["display"].first() if "display" in part else {}
    for ax, value in zip(axes[0], panels):
        keys = [[(r, g, value) if panel else (r, g) for g in groups] for r in rows]
        means = [[stats["mean"].get(k, np.nan) for k in row_keys] for row_keys in keys]
        errors = [[stats["std"].get(k, np.nan) for k in row_keys] for row_keys in keys]
        labels = [f"{g}-shot" if group == "shot" else f"{group.title()} {g}" for g in groups]
        _bars(ax, groups, [names.get(r, r) for r in rows], means, errors, labels)
        if panel:
            ax.set_title(f"{value}-shot" if panel == "shot" else f"{panel} {value}", fontsize=9)
    axes[0][0].set_ylabel(f"{'mIoU' if metric == 'miou' else 'FB-IoU'} (%)")
    fig.suptitle(title, fontsize=10, y=1.04)
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, out_dir, name)


def _smooth(values, window=5):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate(
        [np.full(window // 2, values[0]), values, np.full(window // 2, values[-1])]
    )
    return np.convolve(padded, kernel, mode="valid")[: len(values)]


def training_curves(cells, out_dir, name="training_curves"):
    """Segmentation loss (the term every variant shares; PAR's term is plotted apart), smoothed."""
    plt = _style()
    trained = [c for c in cells if c.get("train") and c["train"].get("curve")]
    if not trained:
        return []
    rows = [
        r
        for r in _rows_in_grid_order(seed_frame(cells))
        if any(row_label(c["config"]) == r for c in trained)
    ]
    has_par = any("par" in c["train"]["curve"][0] for c in trained)
    fig, axes = plt.subplots(
        1, 2 if has_par else 1, squeeze=False, figsize=(9 if has_par else 5, 3)
    )
    styles = ["-", "--", ":", "-."]
    for i, row in enumerate(rows):
        for term, ax in zip(("segmentation", "par"), axes[0]):
            curves = [
                c["train"]["curve"]
                for c in trained
                if row_label(c["config"]) == row and term in c["train"]["curve"][0]
            ]
            if not curves:
                continue
            for j, curve in enumerate(curves):
                ax.plot(
                    [p["step"] for p in curve],
                    _smooth([p[term] for p in curve]),
                    styles[i % len(styles)],
                    color=GREYS[i % len(GREYS)],
                    linewidth=0.8,
                    alpha=0.8,
                    label=row if j == 0 else None,
                )
    axes[0][0].set_title("query segmentation loss (every cell, smoothed)", fontsize=9)
    if has_par:
        axes[0][1].set_title("PAR loss (support segmentation from the query)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(frameon=False, fontsize=8)
    axes[0][0].set_ylabel("cross-entropy")
    return _save(fig, out_dir, name)


def class_names(dataset: str) -> dict[int, str]:
    """Class id → name for the bundled datasets (ids otherwise)."""
    if "coco" in dataset:
        from fsbench.datasets.coco import COCO_CLASSES as names
    elif "pascal" in dataset:
        from fsbench.datasets.pascal import VOC_CLASSES as names
    else:
        return {}
    return dict(enumerate(names, start=1))


def per_class_figure(cells, out_dir, name="per_class_iou"):
    """Per-class IoU (mean over episode seeds) of every row, one panel per shot, classes named."""
    plt = _style()
    frame = seed_frame(cells)
    rows = _rows_in_grid_order(frame)
    names = frame.groupby("row")["display"].first()
    values: dict = {}  # (shot, row) → class → [IoU per cell]
    for cell in cells:
        key = (cell["config"]["shot"], row_label(cell["config"]))
        for class_id, value in cell["summary"]["class_iou_mean"].items():
            values.setdefault(key, {}).setdefault(int(class_id), []).append(
                np.nan if value is None else value
            )
    classes = sorted({c for v in values.values() for c in v})
    if not classes:
        return []
    labels = class_names(cells[0]["config"]["dataset"]["name"])
    shots = sorted({shot for shot, _ in values})
    fig, axes = plt.subplots(
        len(shots),
        1,
        squeeze=False,
        sharex=True,
        figsize=(min(14, max(5, 0.14 * len(classes) * len(rows))), 2.4 * len(shots) + 0.8),
    )
    width = 0.8 / len(rows)
    for ax, shot in zip(axes[:, 0], shots):
        for i, row in enumerate(rows):
            per_class = values.get((shot, row), {})
            means = [100 * _nanmean(per_class.get(c, [np.nan])) for c in classes]
            ax.bar(
                np.arange(len(classes)) + (i - (len(rows) - 1) / 2) * width,
                means,
                width,
                label=names.get(row, row),
                color=GREYS[i % len(GREYS)],
                hatch=HATCHES[i % len(HATCHES)],
                edgecolor="black",
                linewidth=0.4,
            )
        ax.set_ylabel(f"{shot}-shot IoU (%)")
    axes[-1, 0].set_xticks(
        np.arange(len(classes)),
        [labels.get(c, str(c)) for c in classes],
        rotation=60 if labels else 0,
        ha="right" if labels else "center",
        fontsize=7,
    )
    axes[0, 0].set_title("Per-class IoU (mean over episode seeds)")
    axes[-1, 0].legend(
        frameon=False,
        fontsize=7,
        ncols=min(len(rows), 6),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.45 if labels else -0.2),
    )
    return _save(fig, out_dir, name)


def alpha_figure(frame, out_dir, name="miou_vs_alpha"):
    plt = _style()
    part = frame.dropna(subset=["alpha"])
    if part["alpha"].nunique() < 2:
        return []
    fig, ax = plt.subplots(figsize=(4, 3))
    for i, shot in enumerate(sorted(part["shot"].unique())):
        stats = part[part["shot"] == shot].groupby("alpha")["miou"].agg(["mean", "std"])
        ax.errorbar(
            stats.index,
            stats["mean"],
            yerr=stats["std"],
            marker="os^"[i % 3],
            color=GREYS[i],
            capsize=2,
            label=f"{shot}-shot",
        )
    ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU vs α")
    ax.legend(frameon=False)
    return _save(fig, out_dir, name)


def _input_view(dataset, image_id, classes, size, resize):
    """An image and its first class's mask in the network's input frame (EpisodeLoader's
    geometry, padding black), so predictions line up."""
    from PIL import Image

    from fsbench.datasets.resize import fit

    mask = dataset.load_masks(image_id, classes)[0][0].astype(np.uint8)
    pixels = fit(dataset.load_image(image_id), size, resize, Image.BILINEAR, 0)
    return pixels, fit(mask, size, resize, Image.NEAREST, 0) > 0


_OPENED: dict = {}  # datasets opened for figures, by config


def _qualitative_rows(result: dict, store, max_episodes: int):
    """[(spec, [(image, mask, title) × 3])] for the cell's saved episodes: support + mask,
    query + prediction, query + ground truth (None when the dataset cannot be opened)."""
    from fsbench.datasets.registry import DATASETS
    from fsbench.datasets.synthetic import existing_only

    kept = result.get("qualitative") or []
    if not kept:
        return None
    config = result["config"]
    key = json.dumps([config["dataset"], config["protocol"]], sort_keys=True)
    try:
        if key not in _OPENED:  # one dataset object per process (logging draws one per cell)
            with existing_only():  # a report reads results: it never generates a dataset
                _OPENED[key] = DATASETS.get(config["dataset"]["name"])(
                    protocol=config["protocol"],
                    **{k: v for k, v in config["dataset"].items() if k != "name"},
                )
        dataset = _OPENED[key]
    except FsbenchError as error:
        print(f"fsbench: report: qualitative figure skipped ({error})", file=sys.stderr)
        return None
    seed = next(s for s in result["seeds"] if s["seed"] == kept[0]["seed"])
    manifest = json.loads(
        (Path(store.manifests_dir) / f"{seed['manifest_fingerprint'][:16]}.json").read_text()
    )
    size = config["input_size"]
    resize = get_protocol(config["protocol"]).resize
    rows = []
    for item in kept[:max_episodes]:
        spec = manifest["episodes"][item["episode"]]
        support_id, query_id = spec["support"][0][0], spec["query"][0]
        support, support_label = _input_view(dataset, support_id, spec["classes"], size, resize)
        query, query_label = _input_view(dataset, query_id, spec["classes"], size, resize)
        prediction = np.asarray(item["prediction"])
        rows.append(
            (
                spec,
                [
                    (support, support_label, "support + mask"),
                    (query, prediction == 1, "query + prediction"),
                    (query, query_label, "query + ground truth"),
                ],
            )
        )
    return rows


def qualitative_figure(result: dict, store, path: Path, max_episodes: int = 2):
    """Support (with mask) | query with prediction | query with ground truth, for saved episodes."""
    rows = _qualitative_rows(result, store, max_episodes)
    if not rows:
        return None
    plt = _style()
    fig, axes = plt.subplots(len(rows), 3, figsize=(7, 2.4 * len(rows)), squeeze=False)
    for row, (spec, panels) in enumerate(rows):
        for col, (image, mask, title) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(image)
            ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.5)
            ax.contour(mask.astype(float), levels=[0.5], colors="black", linewidths=0.6)
            ax.imshow(np.ma.masked_where(~mask, mask), alpha=0.55, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title} (class {spec['classes'][0]})" if col == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(result["title"], fontsize=9)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def qualitative_strip(result: dict, store, path: Path, max_episodes: int = 2):
    """The same panels as `qualitative_figure` as one PNG composed with numpy (milliseconds,
    not matplotlib's ~0.8 s): a row per episode, support | prediction | ground truth, the mask
    tinted white over a darkened image."""
    from PIL import Image

    rows = _qualitative_rows(result, store, max_episodes)
    if not rows:
        return None
    strips = []
    for _, panels in rows:
        tiles = []
        for image, mask, _ in panels:
            tile = np.asarray(image, dtype=np.float32) * 0.55
            tile[mask] = 0.45 * np.asarray(image, dtype=np.float32)[mask] + 0.55 * 255
            tiles.append(tile.astype(np.uint8))
            tiles.append(np.full((tile.shape[0], 4, 3), 255, np.uint8))
        strips.append(np.concatenate(tiles[:-1], axis=1))
        strips.append(np.full((4, strips[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(strips[:-1], axis=0)).save(path)
    return Path(path)


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
    for metric, label in (("miou", "miou"), ("fb_iou", "fb_iou")):
        table = paper_table(frame, metric)
        text_note = note if metric == "miou" else note.replace("mIoU %", "FB-IoU %")
        reported = reported_rows(frame, metric, list(table["mean"].columns))
        (out / f"table_{label}.md").write_text(to_markdown(table, text_note, reported))
        name = "mIoU" if metric == "miou" else "FB-IoU"
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
    best = max(
        (c for c in cells if c.get("qualitative")),
        key=lambda c: c["summary"]["miou_mean"],
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
