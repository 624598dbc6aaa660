"""The protocol-sensitivity table (`sensitivity: true` in a grid): per row and shot, how much the
fold-mean mIoU moves when one factor of the evaluation changes on the same model, with a 95%
bootstrap CI (episodes resampled within each fold and seed; paired where both sides score the
same episodes):

- best of the test seeds − their mean (what a "Best_mIoU" headline adds);
- the other label resolution − the protocol's (input-size labels vs original-resolution labels,
  from the grid's evaluation-only copies scored the other way);
- the first 1000 episodes − the protocol's count (when it draws more, e.g. PFENet's 5000);
- the k-shot model's own row − the 1-shot model scoring k shots (rows differing only by
  `train_shot`);
- training list with − without the novel-image filter (rows differing only by
  `train.exclude_novel_images`).
A factor the grid cannot show is "n/a" with the reason. Imports neither torch nor ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fsbench.benchmarks.metrics import _boot_stat, _resample_weights
from fsbench.benchmarks.report.figures import _save, _style
from fsbench.benchmarks.report.frame import display_name, row_label
from fsbench.benchmarks.report.tables import _latex_escape, markdown_text

FACTORS = {
    "best_seed": "best seed − mean of seeds",
    "resolution": "other label resolution − protocol's",
    "episodes": "1000 episodes − protocol's count",
    "train_shot": "own k-shot model − 1-shot model",
    "novel_filter": "novel-image filter on − off",
}
FIRST_EPISODES = 1000


def _key(cell, drop=(), train_drop=()) -> str:
    """A cell's setting less what a factor changes (and its row label), to find its partner."""
    data = {k: v for k, v in cell.config.to_json().items() if k not in ("row", *drop)}
    if data.get("train") and train_drop:
        data["train"] = {k: v for k, v in data["train"].items() if k not in train_drop}
    return json.dumps(data, sort_keys=True)


def _ci(draws_per_fold: list[np.ndarray], values: list[float]) -> tuple[float, float, float]:
    """(fold-mean Δ, CI low, CI high) in percent."""
    draws = np.mean(draws_per_fold, axis=0)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(np.mean(values)), float(low), float(high)


def _paired(pairs: dict, n_boot: int):
    """Δ of `a − b` over {fold: [(seed, a counts, b counts)]}, resampled in pairs."""
    values, draws = [], []
    for fold, runs in sorted(pairs.items()):
        values.append(np.mean([100 * (a.value("miou") - b.value("miou")) for _, a, b in runs]))
        fold_draws = []
        for seed, a, b in runs:
            weights = _resample_weights(len(a.per_class), n_boot, 1000 * fold + seed)
            fold_draws.append(
                100 * (_boot_stat(a, weights, "miou") - _boot_stat(b, weights, "miou"))
            )
        draws.append(np.mean(fold_draws, axis=0))
    return _ci(draws, values)


def _prefix(counts, n: int):
    """The counts of the first `n` episodes."""
    return type(counts)(counts.classes, counts.per_class[:n], counts.background[:n],
                        counts.foreground[:n])  # fmt: skip


def sensitivity_frame(cells, n_boot: int = 1000) -> pd.DataFrame:
    """One row per (table row, shot) of the home cells, a column per factor (Δ and CI)."""
    homes = [c for c in cells if not c.config.score_resolution and not c.config.eval_protocol]
    copies = {_key(c, drop=("score_resolution",)): c for c in cells if c.config.score_resolution}
    by_shot = {_key(c, drop=("train_shot",)): c for c in homes if not c.config.train_shot}
    by_filter = {}
    for cell in homes:
        on = bool((cell.config.train or {}).get("exclude_novel_images"))
        by_filter[(_key(cell, train_drop=("exclude_novel_images",)), on)] = cell
    groups: dict[tuple, list] = {}
    for cell in homes:
        groups.setdefault((row_label(cell.config), cell.config.shot), []).append(cell)
    records = []
    for (row, shot), members in groups.items():
        entry = {"row": row, "display": display_name(members[0]), "shot": shot,
                 "order": min(c.row_index for c in members)}  # fmt: skip
        found: dict[str, dict] = {name: {} for name in FACTORS}
        reasons: dict[str, str] = {}
        for cell in members:
            fold = cell.config.fold
            runs = {s.seed: s.episode_counts() for s in cell.seeds}
            found["best_seed"][fold] = runs
            partner = copies.get(_key(cell))
            if partner is not None:
                other = {s.seed: s.episode_counts() for s in partner.seeds}
                found["resolution"].setdefault(fold, []).extend(
                    (s, other[s], runs[s]) for s in runs if s in other
                )
            if cell.config.episodes > FIRST_EPISODES:
                found["episodes"].setdefault(fold, []).extend(
                    (s, _prefix(c, FIRST_EPISODES), c) for s, c in runs.items()
                )
            shared = _key(cell, drop=("train_shot",))
            if cell.config.train_shot and shared in by_shot:
                own = {s.seed: s.episode_counts() for s in by_shot[shared].seeds}
                found["train_shot"].setdefault(fold, []).extend(
                    (s, own[s], runs[s]) for s in runs if s in own
                )
            key = _key(cell, train_drop=("exclude_novel_images",))
            if (cell.config.train or {}).get("exclude_novel_images") and (key, False) in by_filter:
                off = {s.seed: s.episode_counts() for s in by_filter[(key, False)].seeds}
                found["novel_filter"].setdefault(fold, []).extend(
                    (s, runs[s], off[s]) for s in runs if s in off
                )
        reasons["best_seed"] = "one test seed" if len(members[0].seeds) < 2 else ""
        reasons["resolution"] = "no copy scored the other way"
        reasons["episodes"] = f"the protocol draws ≤ {FIRST_EPISODES}"
        reasons["train_shot"] = "no row of this one's settings with its own k-shot model"
        reasons["novel_filter"] = "no row of this one's settings without the filter"
        for name in FACTORS:
            if name == "best_seed" and not reasons[name]:
                value = _best_seed(found[name], n_boot)
            elif name != "best_seed" and found[name]:
                value = _paired(found[name], n_boot)
            else:
                entry[name] = None
                entry[f"{name}_note"] = f"n/a ({reasons[name]})"
                continue
            entry[name], entry[f"{name}_low"], entry[f"{name}_high"] = value
        records.append(entry)
    if not records:
        return pd.DataFrame()
    return pd.DataFrame(records).sort_values(["order", "row", "shot"]).reset_index(drop=True)


def _best_seed(folds: dict, n_boot: int):
    """Δ = max over seeds − mean over seeds of each fold's mIoU, fold mean; resampled per seed."""
    values, draws = [], []
    for fold, runs in sorted(folds.items()):
        per_seed = {s: 100 * c.value("miou") for s, c in runs.items()}
        values.append(max(per_seed.values()) - np.mean(list(per_seed.values())))
        samples = np.stack(
            [
                100
                * _boot_stat(
                    c, _resample_weights(len(c.per_class), n_boot, 1000 * fold + s), "miou"
                )  # fmt: skip
                for s, c in runs.items()
            ]
        )
        draws.append(samples.max(0) - samples.mean(0))
    return _ci(draws, values)


def _missing(entry: pd.Series, name: str) -> bool:
    return entry.get(name) is None or (isinstance(entry[name], float) and np.isnan(entry[name]))


def _cell_text(entry: pd.Series, name: str) -> str:
    if _missing(entry, name):
        return "n/a"
    return f"{entry[name]:+.1f} [{entry[f'{name}_low']:+.1f}, {entry[f'{name}_high']:+.1f}]"


NOTE = (
    "Δ mIoU (points, fold mean) when one factor of the evaluation changes on the same model, "
    "with its 95% bootstrap CI (episodes resampled within each fold and seed, paired where both "
    "sides score the same episodes). Best of seeds selects on the test set."
)


def _why_missing(frame: pd.DataFrame) -> str:
    """n/a, factor by factor: why (once per distinct reason)."""
    reasons = []
    for name, label in FACTORS.items():
        notes = {
            str(e[f"{name}_note"]).removeprefix("n/a (").removesuffix(")")
            for _, e in frame.iterrows()
            if _missing(e, name) and isinstance(e.get(f"{name}_note"), str)
        }
        reasons += [f"{label}: {note}" for note in sorted(notes)]
    return f" n/a — {'; '.join(reasons)}." if reasons else ""


def sensitivity_markdown(frame: pd.DataFrame) -> str:
    lines = [
        "| Method | Shot | " + " | ".join(FACTORS.values()) + " |",
        "|---|:-:|" + ":-:|" * len(FACTORS),
    ]
    for _, entry in frame.iterrows():
        cells = [_cell_text(entry, name) for name in FACTORS]
        lines.append(f"| {markdown_text(entry['display'])} | {entry['shot']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + f"\n\n{NOTE}{_why_missing(frame)}\n"


def sensitivity_latex(frame: pd.DataFrame) -> str:
    spec = "ll" + "c" * len(FACTORS)
    head = " & ".join(["Method", "Shot", *(_latex_escape(v) for v in FACTORS.values())])
    body = [
        " & ".join([_latex_escape(e["display"]), str(e["shot"]),
                    *(_latex_escape(_cell_text(e, n)) for n in FACTORS)]) + r" \\"
        for _, e in frame.iterrows()
    ]  # fmt: skip
    return "\n".join(
        [
            r"\begin{table*}[t]",
            r"\centering\footnotesize",
            r"\resizebox{\linewidth}{!}{%",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            head + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}}",
            rf"\caption{{Protocol sensitivity. {_latex_escape(NOTE + _why_missing(frame))}}}",
            r"\end{table*}",
            "",
        ]
    )


def sensitivity_csv(frame: pd.DataFrame) -> pd.DataFrame:
    columns = ["display", "shot"]
    for name in FACTORS:
        columns += [c for c in (name, f"{name}_low", f"{name}_high", f"{name}_note")
                    if c in frame]  # fmt: skip
    return frame[columns].rename(columns={"display": "method"})


def sensitivity_figure(frame: pd.DataFrame, out_dir, name: str = "sensitivity") -> list:
    """One panel per factor: a bar per (row, shot) with its CI; factors without data omitted."""
    import matplotlib.pyplot as plt

    shown = [f for f in FACTORS if f in frame and frame[f].notna().any()]
    if not shown:
        return []
    _style()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 0.5 * len(frame) + 1.6),
                             sharey=True, squeeze=False)  # fmt: skip
    labels = [f"{d}, {s}-shot" for d, s in zip(frame["display"], frame["shot"])]
    for ax, factor in zip(axes[0], shown):
        values = frame[factor].astype(float)
        low = (values - frame[f"{factor}_low"].astype(float)).clip(lower=0)
        high = (frame[f"{factor}_high"].astype(float) - values).clip(lower=0)
        positions = np.arange(len(frame))
        ax.barh(positions, values.fillna(0), xerr=[low.fillna(0), high.fillna(0)],
                color="0.55", edgecolor="0.2", capsize=2)  # fmt: skip
        ax.axvline(0, color="0.2", linewidth=0.8)
        ax.set_title(FACTORS[factor], fontsize=8)
        ax.set_xlabel("Δ mIoU (points)")
        ax.set_yticks(positions, labels, fontsize=7)
    axes[0][0].invert_yaxis()  # once: the panels share the axis (the grid's order, top down)
    fig.tight_layout()
    return _save(fig, out_dir, name)
