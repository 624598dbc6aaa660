"""Paired comparisons a paper reports: per fold and of the fold mean, Holm-corrected."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fsbench.benchmarks.metrics import (
    _boot_stat,
    _resample_weights,
    bootstrap_ci,
)
from fsbench.benchmarks.report.frame import display_name, row_label


def statistics(cells: list[dict], n_boot: int = 1000, compare=()) -> pd.DataFrame:
    """Per cell and seed: the 95% bootstrap CI of its mIoU. Per declared pair (variant, base),
    per shot: the paired difference per fold and of the fold mean (the number a paper reports),
    by a paired bootstrap over episodes (both rows resampled alike, on the same manifests;
    training-seed replicates paired by seed), with Holm-corrected p-values over all of them."""
    rows = []
    names = {cell.config.row: display_name(cell) for cell in cells}  # what the tables print
    by_setting: dict = {}  # (row, fold, way, shot, annotation) → {train seed: {seed: counts}}
    for cell in cells:
        config = cell.config
        for seed in cell.seeds:
            counts = seed.episode_counts()
            low, high = bootstrap_ci(counts, n_boot=n_boot, seed=seed.seed)
            rows.append(
                {
                    "kind": "ci",
                    "row": row_label(config),
                    "name": display_name(cell),
                    "fold": config.fold,
                    "shot": config.shot,
                    "seed": seed.seed,
                    "episodes": len(counts.per_class),
                    "value": 100 * counts.miou(),
                    "low": 100 * low,
                    "high": 100 * high,
                    "versus": "",
                    "versus_name": "",
                    "p": np.nan,
                    "p_holm": np.nan,
                    "significant": "",
                }
            )
            key = (config.row, config.fold, config.way, config.shot)
            key += (config.annotation,)
            by_setting.setdefault(key, {}).setdefault(config.train_seed, {})[seed.seed] = (
                counts,
                seed.manifest_fingerprint,
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
                "name": names.get(variant, variant),
                "fold": fold,
                "shot": shot,
                "seed": "all",
                "value": 100 * observed,
                "low": 100 * low,
                "high": 100 * high,
                "versus": base,
                "versus_name": names.get(base, base),
                "resamples": len(replicates),  # p at its floor (2/B) reads "< 1/B"
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
    budget = episode_budget(stats)
    if not len(paired):
        return "\n".join(
            lines
            + [
                "No comparison declared: add `compare: [[variant, base]]` (rows of the grid) to "
                "the grid file.",
                "",
            ]
            + budget
        )
    lines += [
        "| Variant | vs | Shot | Fold | Δ mIoU | 95% CI | p | p (Holm) | Significant |",
        "|---|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|",
    ]
    for _, r in paired.iterrows():
        fold = "**mean**" if r["fold"] == "Mean" else r["fold"]
        lines.append(
            f"| {r['name']} | {r['versus_name']} | {r['shot']} | {fold} | {r['value']:+.1f} | "
            f"[{r['low']:+.1f}, {r['high']:+.1f}] | {_p_text(r['p'], r['resamples'])} | "
            f"{r['p_holm']:.3f} | {r['significant']} |"
        )
    lines += [
        "",
        f"{(paired['significant'] == 'yes').sum()} of {len(paired)} differences are significant "
        "at 5% after Holm's correction. The intervals resample episodes: with several "
        "`train_seeds` they pair models seed by seed but do not resample the training runs.",
        "",
    ]
    return "\n".join(lines + budget)


BUDGET_TARGET = 0.5  # the ± (mIoU points) the episode budget is sized for


def episode_budget(stats: pd.DataFrame) -> list[str]:
    """Markdown lines: per cell (row, fold, shot) the 95% bootstrap CI half-width of one seed's
    mIoU (mean over its seeds) and the episodes per seed that would bring it to ±0.5 (the
    half-width shrinks as 1/√episodes)."""
    cis = stats[stats["kind"] == "ci"] if len(stats) else stats
    if not len(cis) or "episodes" not in cis:
        return []
    lines = [
        f"# Episode budget (95% bootstrap CI of one seed's mIoU; episodes for ±{BUDGET_TARGET})",
        "",
        "| Method | Shot | Fold | Episodes | mIoU | ± half-width | Episodes for ±0.5 |",
        "|---|:-:|:-:|:-:|:-:|:-:|:-:|",
    ]
    groups = cis.groupby(["name", "shot", "fold"], sort=False)
    for (name, shot, fold), group in groups:
        episodes = int(group["episodes"].mean())
        half = float(((group["high"] - group["low"]) / 2).mean())
        needed = int(np.ceil(episodes * (half / BUDGET_TARGET) ** 2)) if half > 0 else episodes
        lines.append(
            f"| {name} | {shot} | {fold} | {episodes} | {group['value'].mean():.1f} | "
            f"{half:.2f} | {needed} |"
        )
    return lines + [
        "",
        "Half-widths are the mean over the cell's episode seeds; the last column assumes the "
        "half-width shrinks as 1/√episodes.",
        "",
    ]


def _p_text(p: float, resamples) -> str:
    """A p-value as the bootstrap can know it: at its floor (no replicate crossed zero) it is
    only known to be below 1/B, so it reads "< 1/B" rather than the floor's number."""
    if resamples and p <= 2 / resamples + 1e-12:
        return f"< 1/{int(resamples)}"
    return f"{p:.3f}"
