"""leakage.md / leakage.csv: per fold of the grid and per protocol's training list, the training
images holding pixels of the fold's test classes and those pixels' share (datasets/leakage.py),
and the training lists the grid's models actually drew from (fingerprinted; BAM's
`train.exclude_novel_images` filter shows as excluded images)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fsbench.benchmarks.report.frame import row_label
from fsbench.core import FsbenchError, atomic_write_text
from fsbench.datasets.leakage import audit
from fsbench.datasets.protocols import resolve, training_list_protocols
from fsbench.datasets.registry import open_dataset
from fsbench.datasets.synthetic import existing_only


def leakage_frame(cells) -> tuple[pd.DataFrame, str]:
    """(one row per protocol × fold, "") or (empty, why the audit could not be made)."""
    config = cells[0].config
    folds = sorted({c.config.fold for c in cells})
    rows = []
    try:
        with existing_only():  # a report reads data; it never generates a dataset
            for name in training_list_protocols():  # each training list once
                preset = resolve(name, config.dataset_name)
                dataset = open_dataset(config.dataset, preset)
                for fold in folds:
                    row = audit(dataset, preset, fold)
                    if row is None:
                        return pd.DataFrame(), (
                            f"dataset {config.dataset_name} keeps no per-image pixel counts"
                        )
                    rows.append(row)
    except (FsbenchError, OSError, TypeError, ValueError) as error:  # a report never fails on it
        return pd.DataFrame(), f"the dataset could not be opened ({type(error).__name__}: {error})"
    return pd.DataFrame(rows), ""


def training_lists(cells) -> pd.DataFrame:
    """Per trained model of the grid: the list its episodes were drawn from, its fingerprint and
    the images `exclude_novel_images` left out."""
    rows = {}
    for cell in cells:
        train = cell.train or {}
        if not train.get("train_list"):
            continue
        key = (row_label(cell.config, scored=False), cell.config.fold, cell.config.shot)
        rows[key] = {
            "row": key[0],
            "fold": key[1],
            "shot": key[2],
            "train_list": train["train_list"],
            "fingerprint": str(train.get("train_list_fingerprint", ""))[:16] or "not recorded",
            "exclude_novel_images": bool((cell.config.train or {}).get("exclude_novel_images")),
            "excluded_images": int(train.get("excluded_images", 0)),
        }
    return pd.DataFrame([rows[k] for k in sorted(rows)])


def write_leakage(cells, out: Path) -> list[Path]:
    """leakage.md and leakage.csv under `out`."""
    frame, why = leakage_frame(cells)
    lists = training_lists(cells)
    lines = [
        "# Novel-class leakage into training (BAM, Lang et al. CVPR 2022)",
        "",
        "Training images of each fold that hold pixels of the fold's test classes (trained on as "
        "background), under each protocol's training list, on this grid's dataset. Pixel share: "
        "novel-class pixels over all pixels of those images.",
        "",
    ]
    if frame.empty:
        lines += [f"Not computed: {why}.", ""]
    else:
        lines += [
            "| Protocol | Training list | Fold | Training images | With novel pixels | "
            "Share of images | Novel pixel share |",
            "|---|---|:-:|:-:|:-:|:-:|:-:|",
        ]
        for _, r in frame.iterrows():
            lines.append(
                f"| {r['protocol']} | {r['train_list']} | {r['fold']} | {r['train_images']} | "
                f"{r['with_novel_pixels']} | {r['share_of_images']:.1f}% | "
                f"{r['novel_pixel_share']:.1f}% |"
            )
        lines.append("")
    if len(lists):
        lines += [
            "## Training lists of this grid's models",
            "",
            "| Row | Fold | Shot | List | Fingerprint | exclude_novel_images | Excluded |",
            "|---|:-:|:-:|---|---|:-:|:-:|",
        ]
        for _, r in lists.iterrows():
            lines.append(
                f"| {r['row']} | {r['fold']} | {r['shot']} | {r['train_list']} | "
                f"`{r['fingerprint']}` | {'yes' if r['exclude_novel_images'] else 'no'} | "
                f"{r['excluded_images']} |"
            )
        lines.append("")
    atomic_write_text(out / "leakage.md", "\n".join(lines))
    atomic_write_text(out / "leakage.csv", frame.to_csv(index=False, float_format="%.3f"))
    return [out / "leakage.md", out / "leakage.csv"]
