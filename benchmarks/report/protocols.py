"""What a report's numbers depend on (each cell's recorded `depends_on`, grid/provenance.py), and
the protocol dimension: the same model scored under several lineages' protocols (a grid's
`eval_protocols`) side by side, with 95% bootstrap CIs and the spread between protocols."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from fsbench.benchmarks.grid import names
from fsbench.benchmarks.metrics import METRICS, _boot_stat, _resample_weights
from fsbench.benchmarks.report.figures import _bars, _save, _style
from fsbench.benchmarks.report.frame import row_label
from fsbench.benchmarks.report.tables import _latex_escape
from fsbench.datasets.protocols import PROTOCOLS

LABELS = {
    "input_size": "input",
    "score_resolution": "scored at",
    "episodes_x_seeds": "episodes × seeds",
    "sampler": "episodes drawn by",
    "iou_aggregation": "mIoU",
    "fb_iou": "FB-IoU",
    "coco_split": "COCO split",
    "checkpoint_rule": "checkpoint",
    "test_time_augmentation": "test-time augmentation",
    "trained_under": "trained under",
}
NOT_RECORDED = "not recorded (a cell written before fsbench recorded it)"


def depends_on(cell) -> dict[str, str]:
    """The cell's recorded `depends_on`, every key present (older records: "not recorded")."""
    recorded = dict(cell.depends_on or {})
    return {key: str(recorded.get(key, NOT_RECORDED)) for key in LABELS}


def depends_on_note(cells) -> str:
    """What every cell shares, once; then, per protocol the cells are scored under, what differs
    between protocols; "varies by row" (see the CSV) for what differs within one protocol."""
    by_protocol: dict[str, dict[str, set]] = {}
    for cell in cells:
        facts = depends_on(cell)
        seen = by_protocol.setdefault(cell.config.scored_under, {k: set() for k in LABELS})
        for key in LABELS:
            seen[key].add(facts[key])
    common, differing = [], []
    for key, label in LABELS.items():
        every = set().union(*(seen[key] for seen in by_protocol.values()))
        if key == "coco_split" and every == {"n/a"}:
            continue
        if len(every) == 1:
            common.append(f"{label}: {next(iter(every))}")
        elif all(seen[key] == every for seen in by_protocol.values()):
            common.append(f"{label}: varies by row (see the CSV's depends_on columns)")
        else:
            differing.append(key)
    parts = ["; ".join(common)] if common else []
    for protocol in ordered_protocols(by_protocol):
        facts = []
        for key in differing:
            values = by_protocol[protocol][key]
            value = next(iter(values)) if len(values) == 1 else "varies by row (see the CSV)"
            facts.append(f"{LABELS[key]} {value}")
        if facts:
            parts.append(f"scored under {protocol}: " + "; ".join(facts))
    text = "Depends on — " + ". ".join(parts) + "."
    if "test fold †" in text:  # a released checkpoint kept at its best test-fold score
        text += " † after “test fold” marks a checkpoint selected on the test fold."
    return text


def ordered_protocols(names) -> list[str]:
    """Protocol names in the registry's order (panet, pfenet, hsnet), others after them."""
    known = [p for p in PROTOCOLS if p in names]
    return known + sorted(set(names) - set(known))


def depends_on_columns(cells) -> pd.DataFrame:
    """Per table row: `depends_on.<key>` columns (a row's cells' values, '; '-joined when its
    folds or shots differ), for the tables' CSVs."""
    rows: dict[str, dict[str, set]] = {}
    for cell in cells:
        facts = depends_on(cell)
        row = rows.setdefault(row_label(cell.config), {k: set() for k in LABELS})
        for key in LABELS:
            row[key].add(facts[key])
    return pd.DataFrame(
        {
            row: {f"depends_on.{k}": "; ".join(sorted(v)) for k, v in values.items()}
            for row, values in rows.items()
        }
    ).T


def protocol_frame(cells, n_boot: int = 1000) -> pd.DataFrame:
    """Per (model row, shot, scoring protocol): each metric's fold mean (percent) with the 95%
    bootstrap CI of that mean (episodes resampled within each fold and seed); empty when every
    cell is scored under one protocol."""
    if len({c.config.scored_under for c in cells}) < 2:
        return pd.DataFrame()
    groups: dict[tuple, list] = {}
    for cell in cells:
        config = cell.config
        base = names.display_name(_unscored(config), cell.display, cell.method_display)
        key = (row_label(config, scored=False), base, config.shot, config.scored_under)
        groups.setdefault(key, []).append(cell)
    records = []
    for (row, display, shot, protocol), members in groups.items():
        folds: dict[int, list] = {}
        for cell in members:
            for seed in cell.seeds:
                folds.setdefault(cell.config.fold, []).append((seed.seed, seed.episode_counts()))
        entry = {
            "row": row,
            "display": display,
            "shot": shot,
            "protocol": protocol,
            "folds": ",".join(str(f) for f in sorted(folds)),
            "episodes": sum(len(c.per_class) for runs in folds.values() for _, c in runs),
            "order": min(c.row_index for c in members),
        }
        for metric in METRICS:
            values, draws = [], []
            for fold, runs in sorted(folds.items()):
                values.append(np.mean([100 * c.value(metric) for _, c in runs]))
                draws.append(
                    np.mean(
                        [
                            100
                            * _boot_stat(
                                c,
                                _resample_weights(len(c.per_class), n_boot, 1000 * fold + s),
                                metric,
                            )
                            for s, c in runs
                        ],
                        axis=0,
                    )
                )
            low, high = np.nanpercentile(np.mean(draws, axis=0), [2.5, 97.5])
            entry.update(
                {metric: float(np.mean(values)), f"{metric}_low": low, f"{metric}_high": high}
            )
        records.append(entry)
    frame = pd.DataFrame(records)
    order = {p: i for i, p in enumerate(ordered_protocols({c.config.scored_under for c in cells}))}
    frame["protocol_order"] = frame["protocol"].map(order)
    return frame.sort_values(["order", "row", "shot", "protocol_order"]).reset_index(drop=True)


def _unscored(config):
    return dataclasses.replace(config, eval_protocol="")


def spreads(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (row, shot): max − min over protocols of each metric, and which protocol is highest."""
    out = []
    for (row, shot), part in frame.groupby(["row", "shot"], sort=False):
        entry = {"row": row, "display": part["display"].iloc[0], "shot": shot}
        for metric in METRICS:
            entry[f"{metric}_spread"] = float(part[metric].max() - part[metric].min())
            entry[f"{metric}_highest"] = part.loc[part[metric].idxmax(), "protocol"]
        out.append(entry)
    return pd.DataFrame(out)


def protocol_markdown(frame: pd.DataFrame, note: str = "") -> str:
    """The same models under each protocol: metric [95% CI] per protocol, then the spread."""
    protocols = list(dict.fromkeys(frame["protocol"]))
    header = ["Method", "Shot"]
    for protocol in protocols:
        header += [f"{METRICS[m].label} ({protocol})" for m in METRICS]
    header += [f"Spread {METRICS[m].label}" for m in METRICS]
    lines = [
        "# One model, every protocol (fold mean, 95% bootstrap CI over episodes)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|",
    ]
    spread = spreads(frame).set_index(["row", "shot"])
    for (row, shot), part in frame.groupby(["row", "shot"], sort=False):
        cells = [part["display"].iloc[0], str(shot)]
        by = part.set_index("protocol")
        for protocol in protocols:
            for metric in METRICS:
                if protocol not in by.index:
                    cells.append("–")
                    continue
                r = by.loc[protocol]
                cells.append(
                    f"{r[metric]:.1f} [{r[f'{metric}_low']:.1f}, {r[f'{metric}_high']:.1f}]"
                )
        for metric in METRICS:
            s = spread.loc[(row, shot)]
            cells.append(f"{s[f'{metric}_spread']:.1f} (highest: {s[f'{metric}_highest']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each row is one trained (or released, or untrained) model, scored under each "
        "protocol's own episodes, resizing, padding and scoring; the spread is the largest "
        "minus the smallest fold-mean over the protocols. " + note,
        "",
    ]
    return "\n".join(lines)


def protocol_latex(frame: pd.DataFrame, caption: str, note: str = "") -> str:
    """The protocol table as a booktabs table (metric and CI half-width per protocol)."""
    protocols = list(dict.fromkeys(frame["protocol"]))
    metrics = list(METRICS)
    spec = "lc" + "c" * len(protocols) * len(metrics) + "c" * len(metrics)
    heads = [f"\\multicolumn{{{len(metrics)}}}{{c}}{{{p}}}" for p in protocols]
    sub = [METRICS[m].label for m in metrics] * len(protocols)
    lines = [
        "\\begin{table*}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{_latex_escape(caption)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & & " + " & ".join(heads) + f" & \\multicolumn{{{len(metrics)}}}{{c}}{{Spread}} \\\\",
        "Method & Shot & " + " & ".join(sub + [METRICS[m].label for m in metrics]) + " \\\\",
        "\\midrule",
    ]
    spread = spreads(frame).set_index(["row", "shot"])
    for (row, shot), part in frame.groupby(["row", "shot"], sort=False):
        by = part.set_index("protocol")
        cells = [_latex_escape(part["display"].iloc[0]), str(shot)]
        for protocol in protocols:
            for metric in metrics:
                if protocol not in by.index:
                    cells.append("--")
                    continue
                r = by.loc[protocol]
                half = (r[f"{metric}_high"] - r[f"{metric}_low"]) / 2
                cells.append(f"{r[metric]:.1f}\\,{{\\scriptsize$\\pm${half:.1f}}}")
        cells += [f"{spread.loc[(row, shot)][f'{m}_spread']:.1f}" for m in metrics]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if note:
        lines.append(
            "\\par\\smallskip\\parbox{\\linewidth}{\\footnotesize " + _latex_escape(note) + "}"
        )
    lines.append("\\end{table*}")
    return "\n".join(lines) + "\n"


def protocol_figure(frame: pd.DataFrame, out_dir, name: str = "protocols") -> list:
    """Bars per method, one per protocol, with 95% CIs; a panel per metric and shot."""
    plt = _style()
    protocols = list(dict.fromkeys(frame["protocol"]))
    shots = sorted(frame["shot"].unique())
    rows = list(dict.fromkeys(frame["row"]))
    displays = frame.groupby("row")["display"].first()
    panels = [(m, s) for m in METRICS for s in shots]
    fig, axes = plt.subplots(
        1,
        len(panels),
        squeeze=False,
        figsize=(1.0 + len(panels) * (0.6 + 0.3 * len(rows) * len(protocols)), 3),
    )
    for ax, (metric, shot) in zip(axes[0], panels):
        part = frame[frame["shot"] == shot].set_index(["protocol", "row"])
        means, errors = [], []
        for protocol in protocols:
            keys = [(protocol, r) for r in rows]
            value = [part[metric].get(k, np.nan) for k in keys]
            low = [part[f"{metric}_low"].get(k, np.nan) for k in keys]
            high = [part[f"{metric}_high"].get(k, np.nan) for k in keys]
            means.append(value)
            errors.append([np.subtract(value, low), np.subtract(high, value)])
        _bars(
            ax,
            rows,
            [f"{p} protocol" for p in protocols],
            means,
            errors,
            [displays[r] for r in rows],
        )
        ax.set_title(f"{METRICS[metric].label} · {shot}-shot", fontsize=9)
        if shot == shots[0]:
            ax.set_ylabel(f"{METRICS[metric].label} (%)")
        ax.tick_params(axis="x", labelrotation=30)
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle("The same models under each protocol (fold mean, 95% CI)", fontsize=10, y=1.04)
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, out_dir, name)
