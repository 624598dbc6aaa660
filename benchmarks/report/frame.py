"""Cell records of a results folder: loading and validating them, rows and names, the tidy
per-seed frame (imports neither torch nor ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fsbench.benchmarks.grid import names
from fsbench.benchmarks.grid.names import GREEK  # noqa: F401 (re-exported)
from fsbench.benchmarks.metrics import METRICS
from fsbench.benchmarks.store.records import (
    CellConfig,
    CellRecord,
    read_cells,
)  # noqa: F401


def load_cells(grid_dir: Path, rejected: dict | None = None) -> list[CellRecord]:
    """The grid folder's valid cell records; each rejected file is put in `rejected` (file name →
    why): a report shows only what its grid computed, as the run wrote it."""
    grid_dir = Path(grid_dir)
    return read_cells(grid_dir / "cells", grid_dir.name, rejected)


def current_cells(cells: list[CellRecord]) -> tuple[list[CellRecord], list[CellRecord]]:
    """Cells that one table cell would mix (same row label and setting, different configs, e.g.
    after a grid edit): keep the newest of each, and return the superseded ones apart."""
    newest: dict[tuple, CellRecord] = {}
    for cell in sorted(cells, key=lambda c: c.finished_at):
        c = cell.config
        key = (
            row_label(c),
            c.dataset_name,
            c.fold,
            c.way,
            c.shot,
            c.protocol,
            c.scored_under,
            c.train_seed,
            c.score_resolution,  # a sensitivity copy is another table cell, not a newer one
        )
        newest[key] = cell
    kept = list(newest.values())
    ids = {c.cell_id for c in kept}
    return kept, [c for c in cells if c.cell_id not in ids]


def row_label(config: CellConfig, scored: bool = True) -> str:
    """The table row of a cell: its variant, plus way and annotation where they are not 1/mask,
    and the protocol it is scored under where it is not the one it trains under."""
    label = config.row
    if config.way != 1:
        label += f" {config.way}-way"
    if config.annotation != "mask":
        label += f" ({config.annotation})"
    if scored and config.eval_protocol:
        label += f" @{config.eval_protocol}"
    return label


def display_name(cell: CellRecord) -> str:
    """The name a paper prints for a cell's row (grid/names.py)."""
    return names.display_name(cell.config, cell.display, cell.method_display)


def seed_frame(cells: list[CellRecord]) -> pd.DataFrame:
    """One row per (cell, seed): the tidy data every table and figure is computed from."""
    rows = []
    for cell in cells:
        config = cell.config
        for seed in cell.seeds:
            rows.append(
                {
                    "row": row_label(config),
                    "display": display_name(cell),
                    "method": config.method,
                    "dataset": config.dataset_name,
                    "fold": config.fold,
                    "way": config.way,
                    "shot": config.shot,
                    "annotation": config.annotation,
                    "protocol": config.protocol,
                    "scored_under": config.scored_under,
                    "model_row": row_label(config, scored=False),
                    "alpha": config.method_kwargs.get("alpha"),
                    "seed": seed.seed,
                    "train_seed": config.train_seed,
                    **{m: 100 * seed.metric(m) for m in METRICS},
                    "episodes": seed.episodes,
                    "fingerprint": seed.manifest_fingerprint[:12],
                    # what the row costs and was pretrained on (measured by its evaluation task)
                    "pretraining": ", ".join(cell.timings.get("pretraining") or ()),
                    "parameters": cell.timings.get("parameters"),
                    "declared_cost": cell.timings.get("declared_cost") or "",
                    "seconds_per_episode": seed.eval_seconds / max(seed.episodes, 1),
                    "peak_rss_bytes": seed.peak_rss_bytes,
                    "peak_device_bytes": cell.timings.get("peak_device_bytes") or None,
                    "device": seed.device,
                    "cell_id": cell.cell_id,
                    "row_index": cell.row_index,
                }
            )
    frame = pd.DataFrame(rows)
    if len(frame) and frame["dataset"].nunique() > 1:
        # A cross-domain grid (one model, several test sets of one fold each): its tables'
        # columns are the test sets, where a one-dataset grid's are its folds.
        frame["fold"] = frame["dataset"]
    return frame


# The column order of a cross-domain table: PATNet's, then any other test set by name.
TEST_SET_ORDER = ("deepglobe", "isic2018", "chest_xray", "fss1000")


def fold_order(frame: pd.DataFrame) -> list:
    """The fold columns of a table: fold numbers in order, or a cross-domain grid's test sets."""
    folds = list(frame["fold"].unique())
    if all(isinstance(f, str) for f in folds):  # (generated versions sort as their sets)

        def rank(name: str) -> tuple:
            plain = name.removeprefix("synthetic_")
            known = plain in TEST_SET_ORDER
            return (not known, TEST_SET_ORDER.index(plain) if known else 0, plain)

        return sorted(folds, key=rank)
    return sorted(folds)


def fold_label(fold, prefix: str = "Fold-") -> str:
    """`Fold-0` … (a table's column; prefix "fold": the per-fold metric in MLflow), or the
    test set's name (a cross-domain grid)."""
    return fold if isinstance(fold, str) else f"{prefix}{fold}"


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def _rows_in_grid_order(frame: pd.DataFrame) -> list[str]:
    order = frame.groupby("row")["row_index"].min().sort_values(kind="stable")
    return list(order.index)
