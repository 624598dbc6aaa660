"""Cell records of a results folder: loading and validating them, rows and names, the tidy
per-seed frame (imports neither torch nor ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fsbench.benchmarks.metrics import METRICS, EpisodeCounts

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
            for metric in (m for m in METRICS if m in seed):  # metrics added later: absent
                value = counts.value(metric)
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
    "finetune_linear": "Linear probe",  # its former name
    "linear_probe": "Linear probe",
    "finetune": "Fine-tuning (OSLSM)",
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
                    **{m: 100 * _seed_metric(seed, m) for m in METRICS},
                    "episodes": seed["episodes"],
                    "fingerprint": seed["manifest_fingerprint"][:12],
                    "cell_id": cell["cell_id"],
                    "row_index": cell.get("row_index", 0),
                }
            )
    return pd.DataFrame(rows)


def _seed_metric(seed: dict, metric: str) -> float:
    """A seed's recorded metric; one registered after the record was written, from its counts."""
    if metric in seed:
        return seed[metric]
    return EpisodeCounts.from_json(seed["counts"]).value(metric)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def _rows_in_grid_order(frame: pd.DataFrame) -> list[str]:
    order = frame.groupby("row")["row_index"].min().sort_values(kind="stable")
    return list(order.index)
