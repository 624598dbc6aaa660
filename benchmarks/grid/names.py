"""How a cell is named for people: the display name a paper prints for a method row (the grid's
`display:`, else the name the method declares at registration — `register_method(display=…)` —
with its swept values, way and annotation) and the
title of a cell (display name · fold · shot). Ids stay ids (cell files, params); every table,
figure, legend, console line and MLflow run name uses these."""

from __future__ import annotations

GREEK = {"alpha": "α", "par_weight": "λ"}


def display_name(config, display: str | None = None, method_display: str | None = None) -> str:
    """The name a paper prints for a cell's row (`config`: a CellConfig): the grid's
    `display:`, else the method's usual name (`method_display`, declared where the method is
    registered) with its swept values, way and annotation."""
    name = display
    if not name:
        method, label = config.method, config.row
        name = method_display or method
        if label.startswith(f"{method}[") and label.endswith("]"):
            values = label[len(method) + 1 : -1].split(",")
            swept = ", ".join(
                GREEK.get(k, k) + "=" + v for k, _, v in (x.partition("=") for x in values)
            )
            name = f"{name} ({swept})"
        elif label != method:
            name = label  # the grid's own label
    if config.way != 1:
        name += f", {config.way}-way"
    if config.annotation != "mask":
        name += f" ({config.annotation})"
    if getattr(config, "eval_protocol", ""):  # scored under another lineage's protocol
        name += f" [{config.eval_protocol} protocol]"
    if getattr(config, "score_resolution", ""):  # a sensitivity copy, scored the other way
        name += f" [{config.score_resolution}-resolution labels]"
    return name


def cell_title(
    config,
    display: str | None = None,
    train_seed: int | None = None,
    method_display: str | None = None,
) -> str:
    """`PANet w/o PAR · fold 0 · 1-shot` (· train seed s for a replicate of several)."""
    name = display_name(config, display, method_display)
    # a model trained on other data (cross-domain): the test set names the cell, not its fold
    where = config.dataset_name if (config.train or {}).get("dataset") else f"fold {config.fold}"
    title = f"{name} · {where} · {config.shot}-shot"
    if config.protocol and config.protocol != "panet":
        title += f" · {config.protocol}"
    return title + (f" · train seed {train_seed}" if train_seed is not None else "")
