"""What a cell's numbers depend on, in words a reader of a table needs (the switches on which
few-shot segmentation papers silently differ): recorded with each cell, printed under every
table, written into the CSVs and logged as MLflow params."""

from __future__ import annotations

from fsbench.methods import METHODS

# Released weights of these lineages were kept by the official training script at its best
# validation mIoU on the test fold's own classes (PFENet train.py, HSNet train.py): a checkpoint
# selected on the test fold, marked as such wherever it is reported.
TEST_FOLD_SELECTION = {"pfenet", "hsnet"}
DEPENDS_ON_KEYS = (
    "input_size",
    "score_resolution",
    "episodes_x_seeds",
    "sampler",
    "iou_aggregation",
    "fb_iou",
    "coco_split",
    "checkpoint_rule",
    "test_time_augmentation",
    "trained_under",
)


def depends_on(cell) -> dict[str, str]:
    """{key: value} in DEPENDS_ON_KEYS order for one cell (its scoring protocol resolved)."""
    preset, config = cell.preset, cell.settings()
    resolution = (
        "original label resolution (logits upsampled bilinearly to each label)"
        if preset.score_resolution == "original"
        else f"input resolution (labels resized nearest to {config.input_size} px)"
    )
    present = (
        "; a class is counted only in episodes whose query contains it (PANet's)"
        if preset.only_present_classes
        else ""
    )
    sampler = (
        f"official (the {preset.name} test script's episodes, replayed)"
        if config.sampler == "official"
        else "fsbench (distinct supports, one seeded generator)"
    )
    coco = "coco" in config.dataset_name
    return {
        "input_size": f"{config.input_size} px ({preset.resize} resize)",
        "score_resolution": resolution,
        "episodes_x_seeds": f"{config.episodes} × {len(config.seeds)} "
        f"(seeds {', '.join(map(str, config.seeds))})",
        "sampler": sampler,
        "iou_aggregation": "per class: tp, fp, fn summed over the fold's episodes, IoU per "
        f"class, mean over the fold's classes{present}",
        "fb_iou": "mean of background and foreground IoU, counts summed over the fold's episodes",
        "coco_split": (
            f"{preset.coco_split} (test images from COCO-2014 {preset.coco_test_images}, "
            f"crowds {preset.coco_crowd})"
            if coco
            else "n/a"
        ),
        "checkpoint_rule": checkpoint_rule(cell),
        "test_time_augmentation": test_time_augmentation(config.method),
        "trained_under": (
            f"{config.protocol} protocol"
            + (f", the {config.train_shot}-shot model" if config.train_shot else "")
            if cell.train is not None
            else "not trained by fsbench"
        ),
    }


def checkpoint_rule(cell) -> str:
    """Which weights are scored: the last step, the best on held-out training classes, or a
    released checkpoint (of a lineage selecting on the test fold: marked "test fold †")."""
    if cell.method.checkpoint:
        path, kind, digest = cell.method.checkpoint
        if kind == "official" and cell.method.name in TEST_FOLD_SELECTION:
            return f"test fold † (released {cell.method.name} weights, sha256 {digest[:12]})"
        return f"released checkpoint (sha256 {digest[:12]})"
    if cell.train is None:
        return "untrained (no checkpoint)"
    if cell.train.val_classes:
        return f"held-out classes (best of {cell.train.val_classes} training classes held out)"
    return f"last step ({cell.train.total_steps} steps)"


def test_time_augmentation(method: str) -> str:
    """What the method's class declares (`test_time_augmentation`), else none."""
    declared = METHODS.provides(method)
    return str(getattr(declared, "test_time_augmentation", "") or "none")
