"""Figures of a report (greyscale-safe, TrueType fonts) and the qualitative panels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fsbench.benchmarks.grid.names import cell_title
from fsbench.benchmarks.metrics import get_metric
from fsbench.benchmarks.report.frame import (
    _nanmean,
    _rows_in_grid_order,
    display_name,
    row_label,
    seed_frame,
)
from fsbench.benchmarks.tracking.panels import class_names, qualitative_rows
from fsbench.core import atomic_write_bytes


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


def save_figure(fig, path: Path) -> None:
    """Render in memory, then write whole or not at all: an interrupted report never leaves a
    0-byte or truncated PNG/PDF beside the previous ones."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for suffix in ("png", "pdf"):
        path = out_dir / f"{name}.{suffix}"
        save_figure(fig, path)
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
    axes[0][0].set_ylabel(f"{get_metric(metric).label} (%)")
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
    trained = [c for c in cells if c.train and c.train.get("curve")]
    if not trained:
        return []
    rows = [
        r
        for r in _rows_in_grid_order(seed_frame(cells))
        if any(row_label(c.config) == r for c in trained)
    ]
    has_par = any("par" in c.train["curve"][0] for c in trained)
    displays = {row_label(c.config): display_name(c) for c in trained}
    fig, axes = plt.subplots(
        1, 2 if has_par else 1, squeeze=False, figsize=(9 if has_par else 5, 3)
    )
    styles = ["-", "--", ":", "-."]
    for i, row in enumerate(rows):
        for term, ax in zip(("segmentation", "par"), axes[0]):
            curves = [
                c.train["curve"]
                for c in trained
                if row_label(c.config) == row and term in c.train["curve"][0]
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
                    label=displays.get(row, row) if j == 0 else None,
                )
    axes[0][0].set_title("query segmentation loss (every cell, smoothed)", fontsize=9)
    if has_par:
        axes[0][1].set_title("PAR loss (support segmentation from the query)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(frameon=False, fontsize=8)
    axes[0][0].set_ylabel("cross-entropy")
    return _save(fig, out_dir, name)


def per_class_figure(cells, out_dir, name="per_class_iou"):
    """Per-class IoU (mean over episode seeds) of every row, one panel per shot, classes named."""
    plt = _style()
    frame = seed_frame(cells)
    rows = _rows_in_grid_order(frame)
    names = frame.groupby("row")["display"].first()
    values: dict = {}  # (shot, row) → class → [IoU per cell]
    for cell in cells:
        key = (cell.config.shot, row_label(cell.config))
        for class_id, value in cell.summary["class_iou_mean"].items():
            values.setdefault(key, {}).setdefault(int(class_id), []).append(
                np.nan if value is None else value
            )
    classes = sorted({c for v in values.values() for c in v})
    if not classes:
        return []
    labels = class_names(cells[0].config.dataset_name)
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


def qualitative_figure(result: dict, store, path: Path, max_episodes: int = 2):
    """Support (with mask) | query with prediction | query with ground truth, for saved episodes."""
    rows = qualitative_rows(result, store, max_episodes)
    if not rows:
        return None
    plt = _style()
    names = class_names(result.config.dataset_name)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7, 2.4 * len(rows)), squeeze=False)
    for row, (spec, panels) in enumerate(rows):
        for col, (image, mask, title) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(image)
            ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.5)
            ax.contour(mask.astype(float), levels=[0.5], colors="black", linewidths=0.6)
            ax.imshow(np.ma.masked_where(~mask, mask), alpha=0.55, cmap="gray", vmin=0, vmax=1)
            class_id = int(spec["classes"][0])
            what = names.get(class_id, f"class {class_id}")
            ax.set_title(f"{title} ({what})" if col == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(cell_title(result.config, result.display), fontsize=9)
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path
