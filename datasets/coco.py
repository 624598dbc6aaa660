"""COCO-20i on the real COCO layout (annotations/instances_{train,val}{2014,2017}.json + images)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from fsbench.core import atomic_write_text, canonical_sha256, default_cache_dir
from fsbench.datasets.base import FewShotDataset
from fsbench.datasets.coco_checks import check_instances, segmentation_problem
from fsbench.datasets.pascal import (
    DatasetError,
    IndexLock,
    check_file_name,
    read_rgb,
)
from fsbench.datasets.protocols import get_protocol
from fsbench.datasets.registry import DATASETS

# The 80 COCO categories in sorted category-id order (ids 1…90 with gaps): class k is the k-th.
COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
SPLIT_STYLES = ("consecutive", "interleaved")
CROWD_MODES = ("keep", "ignore", "skip")
EXPECTED_LAYOUT = (
    "expected annotations/instances_{train,val}2014.json (or 2017) and the image folders "
    "train2014/, val2014/ (or train2017/, val2017/) under --data-root"
)
INDEX_VERSION = 2  # 2: the categories' file order and each class's annotation order


def fold_classes(fold: int, split_style: str) -> list[int]:
    """consecutive (PANet): 20i+1 … 20i+20; interleaved (PFENet/HSNet): c with (c−1) mod 4 = i."""
    if split_style == "consecutive":
        return list(range(20 * fold + 1, 20 * fold + 21))
    return list(range(fold + 1, 81, 4))


class Coco20i(FewShotDataset):
    """COCO-20i: category ids → 1…80 in sorted id order; per-class masks merge the instances."""

    name = "coco20i"
    num_classes = 80
    num_folds = 4
    class_names = COCO_CLASSES
    layout = "coco"
    replayed_by = frozenset({"panet", "pfenet", "hsnet", "matcher"})  # matcher: HSNet's coco.py

    @classmethod
    def published_folds(cls, protocol, split_style=None):
        style = split_style or protocol.coco_split
        folds = [fold_classes(f, style) for f in range(4)]
        return COCO_CLASSES, folds, f"COCO-20i folds, {style} convention:"

    @classmethod
    def protocol_for(cls, protocol):
        """PFENet tests COCO at 641 px on 20001 episodes (its coco_split*.yaml)."""
        return dataclasses.replace(
            protocol,
            input_size=protocol.coco_input_size or protocol.input_size,
            episodes=protocol.coco_episodes or protocol.episodes,
        )

    def __init__(
        self,
        data_root,
        protocol: str = "panet",
        split_style: str | None = None,
        crowd: str | None = None,
        year: int | None = None,
        cache_dir=None,
    ):
        preset = get_protocol(protocol) if isinstance(protocol, str) else protocol
        self.split_style = split_style or preset.coco_split
        self.crowd = crowd or preset.coco_crowd
        if self.split_style not in SPLIT_STYLES:
            raise DatasetError(f"split_style {self.split_style!r}: use one of {SPLIT_STYLES}")
        if self.crowd not in CROWD_MODES:
            raise DatasetError(f"crowd {self.crowd!r}: use one of {CROWD_MODES}")
        root = Path(data_root).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: dataset folder does not exist; {EXPECTED_LAYOUT}")
        years = [year] if year else [2014, 2017]
        found = [y for y in years if (root / "annotations" / f"instances_train{y}.json").is_file()]
        if not found:
            raise DatasetError(
                f"{root / 'annotations'}: no instances_train2014.json or "
                f"instances_train2017.json; {EXPECTED_LAYOUT}"
            )
        self.root, self.year = root.resolve(), found[0]
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "index"
        self._index: dict[str, dict] = {}
        self._index_lock = IndexLock()
        self._owner: dict[str, str] = {}  # image id → split

    # -- folds and splits ---------------------------------------------------------------------
    def check_fold(self, fold: int) -> None:
        if not isinstance(fold, int) or not 0 <= fold < self.num_folds:
            raise DatasetError(f"fold {fold!r} is outside 0…3 for {self.name}")

    def fold_classes(self, fold: int) -> list[int]:
        self.check_fold(fold)
        return fold_classes(fold, self.split_style)

    def train_classes(self, fold: int) -> list[int]:
        held_out = set(self.fold_classes(fold))
        return [c for c in range(1, 81) if c not in held_out]

    def train_split(self, protocol) -> str:
        return "train"

    def test_split(self, protocol) -> str:
        return protocol.coco_test_images

    # -- annotations --------------------------------------------------------------------------
    def annotation_path(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}{self.year}.json"

    def image_folder(self, split: str) -> Path:
        return self.root / f"{split}{self.year}"

    @lru_cache(maxsize=2)  # noqa: B019 - one parsed JSON per split and dataset object
    def coco(self, split: str):
        """The pycocotools index of a split (parsed once per process)."""
        from pycocotools.coco import COCO

        path = self.annotation_path(split)
        if not path.is_file():
            raise DatasetError(f"{path}: annotation file is missing; {EXPECTED_LAYOUT}")
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as error:
            raise DatasetError(
                f"{path}: not a valid COCO instances file (not JSON: {error}); re-extract it"
            ) from None
        check_instances(data, path)
        with open(os.devnull, "w") as quiet, _redirect(quiet):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        return coco

    def _category_map(self, split: str) -> dict[int, int]:
        ids = sorted(self.coco(split).getCatIds())
        if len(ids) != 80:
            raise DatasetError(
                f"{self.annotation_path(split)}: has {len(ids)} categories; "
                "COCO-20i needs the 80 COCO categories"
            )
        return {cat: index for index, cat in enumerate(ids, start=1)}

    def class_index(self, split: str) -> dict:
        """{"classes": class → {image id: area}, "images": id → file name}, cached on disk.

        Areas come from the annotations (no mask decoding), so the ~450 MB train2014 JSON is
        parsed once to build it and never per episode."""
        if split not in self._index:
            with self._index_lock:
                if split not in self._index:
                    self._index[split] = self._build_class_index(split)
        return self._index[split]

    def _build_class_index(self, split: str) -> dict:
        path = self.annotation_path(split)
        if not path.is_file():
            raise DatasetError(f"{path}: annotation file is missing; {EXPECTED_LAYOUT}")
        stat = path.stat()
        key = canonical_sha256(
            [
                INDEX_VERSION,
                str(path),
                stat.st_size,
                stat.st_mtime_ns,
                stat.st_ino,
                stat.st_ctime_ns,  # an edit whose mtime was put back (touch -r) still shows
                self.crowd,
            ]
        )[:16]
        cache_file = self.cache_dir / f"{self.name}-{split}{self.year}-{key}.json"
        if cache_file.is_file():
            raw = json.loads(cache_file.read_text())
        else:
            coco, categories = self.coco(split), self._category_map(split)
            classes: dict[str, dict[str, float]] = {str(c): {} for c in range(1, 81)}
            for ann in coco.dataset.get("annotations", []):
                if ann.get("category_id") not in categories:
                    raise DatasetError(
                        f"{path}: annotation {ann.get('id')} has category_id "
                        f"{ann.get('category_id')!r}, which is not among the file's "
                        f"{len(categories)} categories; fix or remove that annotation"
                    )
                if ann.get("iscrowd") and self.crowd != "keep":
                    continue
                image_classes = classes[str(categories[ann["category_id"]])]
                image = str(ann["image_id"])
                image_classes[image] = image_classes.get(image, 0) + float(ann.get("area", 0))
            images = {
                str(i["id"]): check_file_name(i["file_name"], str(path))
                for i in coco.dataset.get("images", [])
            }
            # Each class's images stay in annotation order (first appearance) and the categories
            # in file order: what pycocotools' getImgIds / getCatIds derive their order from.
            raw = {
                "classes": classes,
                "images": images,
                "category_ids": [c["id"] for c in coco.dataset.get("categories", [])],
            }
            atomic_write_text(cache_file, json.dumps(raw))
        index = {
            "classes": {
                int(c): dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                for c, v in raw["classes"].items()
            },
            "images": raw["images"],
            "annotation_order": {int(c): list(v) for c, v in raw["classes"].items()},
            "category_ids": raw["category_ids"],
        }
        for image_id in index["images"]:
            self._owner[image_id] = split
        return index

    def list_ids(self, split: str) -> list[str]:
        return sorted(self.class_index(split)["images"], key=int)

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        return [
            i
            for i, area in self.class_index(split)["classes"][class_id].items()
            if area >= min_pixels
        ]

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        lists = {c: self.class_images(split, c, min_pixels) for c in range(1, 81)}
        return canonical_sha256(
            {
                "dataset": self.name,
                "split": split,
                "year": self.year,
                "style": self.split_style,
                "crowd": self.crowd,
                "lists": lists,
            }
        )

    # -- images and masks ---------------------------------------------------------------------
    def _split_of(self, image_id: str) -> str:
        if image_id not in self._owner:
            for split in ("train", "val"):
                if self.annotation_path(split).is_file():
                    self.class_index(split)
        if image_id not in self._owner:
            raise DatasetError(
                f"image id {image_id} is in no COCO annotation file under {self.root}"
            )
        return self._owner[image_id]

    def load_image(self, image_id: str) -> np.ndarray:
        split = self._split_of(image_id)
        path = self.image_folder(split) / self.class_index(split)["images"][image_id]
        pixels = read_rgb(path)
        info = self.coco(split).imgs[int(image_id)]
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {pixels.shape[1]}×{pixels.shape[0]} but "
                f"{self.annotation_path(split).name} gives image {image_id} "
                f"{info['width']}×{info['height']}; its masks would not match (re-extract it)"
            )
        return pixels

    def _mask(self, split: str, ann: dict) -> np.ndarray:
        """One annotation's mask; a bad RLE or polygon names the annotation and file."""
        coco = self.coco(split)
        try:
            info = coco.imgs[ann["image_id"]]
            problem = segmentation_problem(ann.get("segmentation"), info["height"], info["width"])
            if problem:
                raise ValueError(problem)
            return coco.annToMask(ann).astype(bool)
        except Exception as error:  # noqa: BLE001 - pycocotools raises bare Exception too
            raise DatasetError(
                f"{self.annotation_path(split)}: annotation {ann.get('id')} of image "
                f"{ann.get('image_id')} has an unusable segmentation ({error}); fix or remove it"
            ) from None

    def load_masks(self, image_id: str, classes) -> tuple[np.ndarray, np.ndarray]:
        """Per-class masks (union of the class's instances, as PANet) and the void mask (crowd
        regions under crowd='ignore')."""
        split = self._split_of(image_id)
        coco, categories = self.coco(split), self._category_map(split)
        info = coco.imgs[int(image_id)]
        masks = np.zeros((len(classes), info["height"], info["width"]), dtype=bool)
        void = np.zeros((info["height"], info["width"]), dtype=bool)
        position = {int(c): i for i, c in enumerate(classes)}
        for ann in coco.imgToAnns[int(image_id)]:
            crowd = bool(ann.get("iscrowd"))
            if crowd and self.crowd == "skip":
                continue
            mask = self._mask(split, ann)
            if crowd and self.crowd == "ignore":
                void |= mask
            elif categories[ann["category_id"]] in position:
                masks[position[categories[ann["category_id"]]]] |= mask
        void &= ~masks.any(0)
        return masks, void

    def instance_masks(self, image_id: str, class_id: int) -> list[np.ndarray]:
        split = self._split_of(image_id)
        coco, categories = self.coco(split), self._category_map(split)
        return [
            self._mask(split, a)
            for a in coco.imgToAnns[int(image_id)]
            if categories[a["category_id"]] == class_id and not a.get("iscrowd")
        ]


class _redirect:
    """Silence pycocotools' prints (it reports progress on stdout)."""

    def __init__(self, target):
        self._context = contextlib.redirect_stdout(target)

    def __enter__(self):
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


@DATASETS.register("coco20i")
def coco20i(data_root: str, **kwargs) -> Coco20i:
    """COCO-20i from a local COCO folder (2014 or 2017 names)."""
    return Coco20i(data_root, **kwargs)
