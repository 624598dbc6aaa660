"""What each row costs and what it was pretrained on: the cost table (parameters, seconds per
episode, peak memory, as the evaluation tasks measured them) and the external-data mark (†) that
tables put on rows whose weights saw data beyond ImageNet (SAM: SA-1B, DINOv2: LVD-142M), as
the foundation-model papers mark them."""

from __future__ import annotations

import pandas as pd

from fsbench.benchmarks.report.frame import _rows_in_grid_order

EXTERNAL_MARK = "†"


def external_rows(frame: pd.DataFrame) -> dict[str, str]:
    """Row → the data beyond ImageNet its method was pretrained on (rows with some only)."""
    if "pretraining" not in frame:
        return {}
    data = frame.groupby("row")["pretraining"].first()
    return {row: data[row] for row in _rows_in_grid_order(frame) if data[row]}


def mark_displays(displays: dict, frame: pd.DataFrame) -> dict:
    """Display names with the external-data mark on the rows it applies to."""
    external = external_rows(frame)
    return {row: f"{name}{EXTERNAL_MARK}" if row in external else name
            for row, name in displays.items()}  # fmt: skip


def external_note(frame: pd.DataFrame, displays: dict) -> str:
    """The note for the mark: which rows used which data ('' when none did)."""
    external = external_rows(frame)
    if not external:
        return ""
    named = "; ".join(f"{displays.get(r, r)}: {d}" for r, d in external.items())
    return (
        f"{EXTERNAL_MARK} after a method's name: pretrained on data beyond ImageNet ({named}); "
        "a grid's strict: true keeps such methods out."
    )


def cost_table(frame: pd.DataFrame, displays: dict) -> pd.DataFrame:
    """One line per row and shot: parameters, seconds per episode (mean over its seeds and
    folds), peak resident memory and peak device memory of its evaluation tasks."""
    rows = []
    order = {row: i for i, row in enumerate(_rows_in_grid_order(frame))}
    groups = sorted(frame.groupby(["row", "shot"]), key=lambda g: (order[g[0][0]], g[0][1]))
    for (row, shot), part in groups:
        params = part["parameters"].dropna()
        rss = part["peak_rss_bytes"].dropna()
        device_bytes = part["peak_device_bytes"].dropna()
        rows.append({
            "method": displays.get(row, row),
            "shot": int(shot),
            "parameters (M)": round(params.max() / 1e6, 2) if len(params) else None,
            "s / episode": round(part["seconds_per_episode"].mean(), 4),
            "peak RSS (GiB)": round(rss.max() / 2**30, 2) if len(rss) else None,
            "peak device memory (GiB)": (
                round(device_bytes.max() / 2**30, 2) if len(device_bytes) else None
            ),
            "device": ", ".join(sorted({d for d in part["device"].dropna() if d})),
            "external data": part["pretraining"].iloc[0] or "–",
            "declared cost": part["declared_cost"].iloc[0] or "–",
        })  # fmt: skip
    return pd.DataFrame(rows)


def cost_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "|".join(["---"] + [":-:"] * (len(table.columns) - 1)) + "|"]
    for _, values in table.iterrows():
        cells = ["–" if v is None or v != v else str(v) for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Measured by the evaluation tasks: parameters of the built model (frozen ones "
        "included), evaluation seconds per episode (encoding included, mean over seeds and "
        "folds), the task process's peak resident memory and, on CUDA, peak allocated memory."
    )
    return "\n".join(lines) + f"\n\n{note}\n"
