"""`fsbench prepare deepglobe|isic2018 RAW OUT`: PATNet's cross-domain test sets made from the
official downloads, in the layouts datasets/cross_domain.py reads (as PATNet's
data/preprocess.py and DR-Adapter's ISIC split make them)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError
from fsbench.datasets.cross_domain import ISIC_CLASSES, ISIC_INPUT, ISIC_TRUTH
from fsbench.datasets.pascal import read_rgb

# -- fsbench prepare: the official downloads → these layouts --------------------------------------

# PATNet's preprocess.py step 3 labelset, as cv2 reads a mask (BGR), turned to RGB here
DEEPGLOBE_COLOURS = [(255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0), (0, 0, 255),
                     (255, 255, 255)]  # fmt: skip
TILES = 6  # preprocess.py step 1: 6 × 6 tiles per image
MIN_SHARE = 0.048  # step 2: every colour of a kept tile covers more than this share


def prepare_deepglobe(raw: Path, out: Path) -> dict[int, int]:
    """Deepglobe's land-cover training set (`<id>_sat.jpg`, colour-coded `<id>_mask.png`, in RAW
    or RAW/train) → OUT/Deepglobe as PATNet's preprocess.py makes it: each image and mask cut
    into 6 × 6 tiles (`int(i * h / 6)` bounds); a tile kept when its mask has more than one
    colour and each covers more than 4.8 % of it; for each class present in a kept tile, the
    tile in <c>/test/origin and its binary mask (RGB 255 where the colour is the class's) in
    <c>/test/groundtruth. Tiles are named `<id>_<i><j>`. Returns tiles per class."""
    raw, out = Path(raw), Path(out) / "Deepglobe"
    source = raw / "train" if (raw / "train").is_dir() else raw
    masks = sorted(source.glob("*_mask.png"))
    if not masks:
        raise FsbenchError(
            f"{source}: no <id>_mask.png of Deepglobe's land-cover training set; pass the folder "
            "of the download (its train/ folder holds <id>_sat.jpg and <id>_mask.png)"
        )
    counts = dict.fromkeys(range(1, 7), 0)
    for mask_file in masks:
        image_id = mask_file.name[: -len("_mask.png")]
        image_file = source / f"{image_id}_sat.jpg"
        if not image_file.is_file():
            raise FsbenchError(f"{mask_file}: its image {image_file} is missing")
        image, mask = read_rgb(image_file), read_rgb(mask_file)
        if image.shape[:2] != mask.shape[:2]:
            raise FsbenchError(f"{mask_file}: {mask.shape[:2]} px, its image {image.shape[:2]}")
        height, width = mask.shape[:2]
        for i in range(TILES):
            for j in range(TILES):
                rows = slice(int(i * height / TILES), int((i + 1) * height / TILES))
                cols = slice(int(j * width / TILES), int((j + 1) * width / TILES))
                tile, labels = image[rows, cols], mask[rows, cols]
                colours, pixels = np.unique(labels.reshape(-1, 3), axis=0, return_counts=True)
                if len(colours) < 2 or pixels.min() / pixels.sum() <= MIN_SHARE:
                    continue
                stem = f"{image_id}_{i}{j}"
                for class_id, colour in enumerate(DEEPGLOBE_COLOURS, start=1):
                    hit = np.all(labels == colour, axis=2)
                    if not hit.any():
                        continue
                    folder = out / str(class_id) / "test"
                    (folder / "origin").mkdir(parents=True, exist_ok=True)
                    (folder / "groundtruth").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(tile).save(folder / "origin" / f"{stem}.jpg", quality=95)
                    binary = np.repeat((hit * 255).astype(np.uint8)[..., None], 3, axis=2)
                    Image.fromarray(binary).save(folder / "groundtruth" / f"{stem}.png")
                    counts[class_id] += 1
    return counts


def prepare_isic(raw: Path, out: Path, classes_csv: Path | None = None) -> dict[int, int]:
    """ISIC 2018 Task 1 (RAW/ISIC2018_Task1-2_Training_Input/*.jpg and RAW/ISIC2018_Task1_
    Training_GroundTruth/*_segmentation.png) and a lesion-type CSV (`ID,Class`, as PATNet's
    data/isic/class_id.csv: RAW/class_id.csv unless given) → OUT/ISIC with one folder per type
    (seborrheic keratosis 1, nevus 2, melanoma 3, as DR-Adapter's split script; PATNet does not
    say). Every image must be in the CSV; images are linked (copied across file systems)."""
    raw, out = Path(raw), Path(out) / "ISIC"
    classes_csv = Path(classes_csv) if classes_csv else raw / "class_id.csv"
    inputs, truth = raw / ISIC_INPUT, raw / ISIC_TRUTH
    for folder in (inputs, truth):
        if not folder.is_dir():
            raise FsbenchError(f"{folder}: missing; RAW must hold ISIC 2018 Task 1's {folder.name}")
    try:
        with open(classes_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise FsbenchError(
            f"{classes_csv}: the lesion-type CSV (ID,Class; PATNet's data/isic/class_id.csv) is "
            "missing; put it there or pass --classes FILE"
        ) from None
    kinds = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("Class") or "").strip().lower().replace(" ", "_")
        if name not in ISIC_CLASSES or not row.get("ID"):
            raise FsbenchError(
                f"{classes_csv}:{line}: {row!r}: expected ID,Class with Class one of "
                f"{', '.join(ISIC_CLASSES)}"
            )
        kinds[row["ID"].strip()] = ISIC_CLASSES[name]
    images = sorted(inputs.glob("*.jpg"))
    if not images:
        raise FsbenchError(f"{inputs}: no ISIC image (*.jpg)")
    counts = dict.fromkeys(range(1, 4), 0)
    for image in images:
        if image.stem not in kinds:
            raise FsbenchError(
                f"{image}: ISIC id {image.stem} is not in the class CSV {classes_csv}; add its "
                "lesion type (or remove the image)"
            )
        mask = truth / f"{image.stem}_segmentation.png"
        if not mask.is_file():
            raise FsbenchError(f"{image}: its mask {mask} is missing")
        class_id = kinds[image.stem]
        _link(image, out / ISIC_INPUT / str(class_id) / image.name)
        _link(mask, out / ISIC_TRUTH / mask.name)
        counts[class_id] += 1
    return counts


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
