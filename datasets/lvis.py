"""LVIS-92i (Matcher, Liu et al., ICLR 2024, aim-uofa/Matcher): few-shot segmentation over the
LVIS v1 categories, 10 folds, test only here (the foundation-model methods it serves are not
trained). Layout, as Matcher's datasets/README.md gives it:

    LVIS/lvis_train.pkl   LVIS/lvis_val.pkl   LVIS/coco/train2017/<12 digits>.jpg   (val2017/…)

A pickle is `{category_id: {"train2017/<12 digits>.jpg": {"annotations": [LVIS annotation,
…]}}}`; its order is the order used. When the pickles are absent, the same structure is built
from the LVIS v1 JSON (`LVIS/lvis_v1_{train,val}.json`: categories in id order, each image under
the folder of its `coco_url`, in the order of its first annotation); `lists_source` and the
manifest say which was read.

Folds (Matcher's matcher/data/lvis.py): the val categories with more than `shot` images, in the
pickle's order, fold F = `ids[F + 10 v]` for `v < n // 10` (leftovers dropped): the 1-shot and
5-shot folds hold different classes, so `classes_at(fold, shot)` gives each; `fold_classes(fold)`
is the 1-shot fold. Class ids are LVIS category ids (1…1203). A query's mask is the union of
its category's annotations (polygons via pycocotools, as detectron2's `polygons_to_bitmask`,
or RLE); other categories in the same image are not labelled, as in Matcher.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError, canonical_sha256
from fsbench.datasets.base import FewShotDataset, Replay, class_cycle_episodes
from fsbench.datasets.pascal import DatasetError, read_rgb
from fsbench.datasets.registry import DATASETS

LVIS_FOLDS = 10
MATCHER_EPISODES = 2300  # DatasetLVIS.__len__ for val
SPLITS = {"train": "train", "val": "val"}
LAYOUT = (
    "expected LVIS/lvis_{train,val}.pkl (Matcher's lvis.zip) or LVIS/lvis_v1_{train,val}.json, "
    "with the COCO 2017 images under LVIS/coco/{train2017,val2017}/"
)


def classwise_from_json(path: Path) -> dict:
    """Matcher's pickle structure from an LVIS v1 JSON: {category_id: {"<folder>/<file>":
    {"annotations": [...]}}}, categories in id order, images in first-annotation order."""
    try:
        document = json.loads(Path(path).read_text())
        images, out = {}, {int(c["id"]): {} for c in sorted(document["categories"],
                                                             key=lambda c: c["id"])}  # fmt: skip
        for image in document["images"]:
            if image["id"] in images:
                raise DatasetError(f"{path}: image id {image['id']} is listed twice in `images`")
            images[image["id"]] = "/".join(image["coco_url"].split("/")[-2:])
        for annotation in document["annotations"]:
            name = images[annotation["image_id"]]
            entry = out[int(annotation["category_id"])].setdefault(name, {"annotations": []})
            entry["annotations"].append(annotation)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: not an LVIS v1 JSON (images with coco_url, annotations, categories): "
            f"{type(error).__name__} {error}"
        ) from None
    return {c: v for c, v in out.items() if v}


def _check_classwise(data, path: Path) -> dict:
    """The pickle's form checked: one line naming the file and the entry that is wrong."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict {{category_id: {{image: …}}}}, got "
                           f"{type(data).__name__}; {LAYOUT}")  # fmt: skip
    for category, images in data.items():
        if not isinstance(category, (int, np.integer)) or not isinstance(images, dict):
            raise DatasetError(f"{path}: entry {category!r} is not category_id → {{image: …}}")
        seen: dict[str, str] = {}
        for name, info in images.items():
            if (
                not isinstance(name, str)
                or not isinstance(info, dict)
                or not isinstance(info.get("annotations"), list)
            ):
                raise DatasetError(f"{path}: category {category} image {name!r} has no "
                                   "'annotations' list")  # fmt: skip
            stem = Path(name).stem
            if stem in seen:
                raise DatasetError(f"{path}: category {category} lists image {stem} twice "
                                   f"({seen[stem]!r} and {name!r})")  # fmt: skip
            seen[stem] = name
    return data


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A polygon list (detectron2's polygons_to_bitmask: frPyObjects, merge, decode) or an RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects([np.asarray(p, dtype=np.float64) for p in segmentation],
                                      height, width)  # fmt: skip
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(segmentation, dict):
        if isinstance(segmentation.get("counts"), list):
            segmentation = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(segmentation).astype(bool)
    raise FsbenchError(f"unknown LVIS segmentation of type {type(segmentation).__name__}")


class Lvis92i(FewShotDataset):
    name = "lvis92i"
    num_classes = 1203
    num_folds = LVIS_FOLDS
    class_names = tuple(f"lvis-{i}" for i in range(1, 1204))
    replayed_by = frozenset({"matcher"})

    @classmethod
    def protocol_for(cls, protocol):
        """Matcher's test loader on LVIS-92i: 2300 episodes a fold."""
        if protocol.official_sampler == "matcher":
            return dataclasses.replace(protocol, episodes=MATCHER_EPISODES)
        return protocol

    def __init__(self, data_root, protocol: str = "matcher", cache_dir=None):
        root = Path(data_root).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: dataset folder does not exist; {LAYOUT}")
        self.root = (root / "LVIS" if (root / "LVIS").is_dir() else root).resolve()
        self.images_root = self.root / "coco"
        self._classwise, sources = {}, []
        for split in SPLITS:
            pkl, js = self.root / f"lvis_{split}.pkl", self.root / f"lvis_v1_{split}.json"
            if pkl.is_file():
                try:
                    with open(pkl, "rb") as handle:
                        data = pickle.load(handle)
                except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as error:
                    raise DatasetError(f"{pkl}: unreadable pickle ({error}); {LAYOUT}") from None
                self._classwise[split] = _check_classwise(data, pkl)
                sources.append(f"{pkl.name} (Matcher's pickle)")
            elif js.is_file():
                self._classwise[split] = classwise_from_json(js)
                sources.append(f"{js.name} (built from the LVIS v1 JSON)")
            elif split == "val":
                raise DatasetError(f"{self.root}: neither lvis_val.pkl nor lvis_v1_val.json; "
                                   f"{LAYOUT}")  # fmt: skip
            else:
                self._classwise[split] = {}
        self.lists_source = "; ".join(sources)
        self._sizes: dict[str, tuple[int, int]] = {}
        self._splits: dict[str, str] = {}  # image → its split (the loader asks per image)
        for split, classwise in self._classwise.items():
            for images in classwise.values():
                for name in images:
                    self._splits.setdefault(name, split)

    # -- folds ------------------------------------------------------------------------------------
    def check_fold(self, fold: int) -> None:
        if not isinstance(fold, int) or not 0 <= fold < LVIS_FOLDS:
            raise DatasetError(f"fold {fold!r}: LVIS-92i has folds 0…{LVIS_FOLDS - 1}")

    def classes_at(self, fold: int, shot: int) -> list[int]:
        """Matcher's fold F at `shot`: val categories with more than `shot` images, every
        tenth from F (so the fold depends on the shot)."""
        self.check_fold(fold)
        kept = [c for c, images in self._classwise["val"].items() if len(images) > shot]
        if len(kept) < LVIS_FOLDS:
            raise DatasetError(
                f"{self.root}: {len(kept)} val categories have more than {shot} images; "
                f"LVIS-92i's {LVIS_FOLDS} folds need at least {LVIS_FOLDS}"
            )
        return [int(kept[fold + LVIS_FOLDS * v]) for v in range(len(kept) // LVIS_FOLDS)]

    def fold_classes(self, fold: int) -> list[int]:
        return self.classes_at(fold, 1)

    def train_classes(self, fold: int) -> list[int]:
        held_out = set(self.fold_classes(fold))
        return [int(c) for c in self._classwise["train"] if c not in held_out]

    def train_split(self, protocol) -> str:
        return "train"

    def test_split(self, protocol) -> str:
        return "val"

    def _split(self, split: str) -> dict:
        if split not in self._classwise:
            raise DatasetError(f"split {split!r}: LVIS-92i has {', '.join(SPLITS)}")
        return self._classwise[split]

    def list_ids(self, split: str) -> list[str]:
        return sorted({n for images in self._split(split).values() for n in images})

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        names = list(self._split(split).get(class_id, {}))
        if min_pixels <= 1:
            return names
        return [n for n in names if self._mask(split, class_id, n).sum() >= min_pixels]

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        lists = {str(c): self.class_images(split, c, min_pixels) for c in self._split(split)}
        return canonical_sha256({"dataset": self.name, "split": split, "lists": lists})

    # -- pixels ---------------------------------------------------------------------------------
    def _path(self, image_id: str) -> Path:
        path = (self.images_root / image_id).resolve()
        if self.images_root.resolve() not in path.parents:
            raise DatasetError(f"{image_id!r}: not an image id of LVIS-92i under {self.root}")
        return path

    def load_image(self, image_id: str) -> np.ndarray:
        image = read_rgb(self._path(image_id))
        self._sizes[image_id] = image.shape[:2]
        return image

    def _size(self, image_id: str) -> tuple[int, int]:
        if image_id not in self._sizes:
            path = self._path(image_id)
            try:
                with Image.open(path) as picture:
                    self._sizes[image_id] = (picture.height, picture.width)
            except FileNotFoundError:
                raise DatasetError(f"{path}: image file is missing; {LAYOUT}") from None
        return self._sizes[image_id]

    def _annotations(self, split: str, class_id: int, image_id: str) -> list:
        return self._split(split).get(class_id, {}).get(image_id, {}).get("annotations", [])

    def _split_of(self, image_id: str) -> str:
        if image_id in self._splits:
            return self._splits[image_id]
        raise DatasetError(f"{image_id!r}: not an image of LVIS-92i's lists under {self.root}")

    def _mask(self, split: str, class_id: int, image_id: str) -> np.ndarray:
        height, width = self._size(image_id)
        mask = np.zeros((height, width), dtype=bool)
        for annotation in self._annotations(split, class_id, image_id):
            try:
                mask |= decode_segmentation(annotation["segmentation"], height, width)
            except (KeyError, ValueError, TypeError) as error:
                raise DatasetError(
                    f"LVIS-92i category {class_id} image {image_id}: unreadable segmentation "
                    f"({error})"
                ) from None
        return mask

    def load_masks(self, image_id: str, classes) -> tuple[np.ndarray, np.ndarray]:
        split = self._split_of(image_id)
        masks = np.stack([self._mask(split, c, image_id) for c in classes])
        return masks, np.zeros(masks.shape[1:], dtype=bool)

    def instance_masks(self, image_id: str, class_id: int) -> list[np.ndarray]:
        split = self._split_of(image_id)
        height, width = self._size(image_id)
        return [decode_segmentation(a["segmentation"], height, width)
                for a in self._annotations(split, class_id, image_id)]  # fmt: skip

    # -- Matcher's test episodes ------------------------------------------------------------------
    def official_episodes(self, protocol, fold, way, shot, n_episodes, seed, queries) -> Replay:
        return Replay(
            tuple(self.matcher_test_episodes(fold, shot, n_episodes, seed)),
            f"Matcher's LVIS-92i lists from {self.lists_source}",
            canonical_sha256({str(c): list(v) for c, v in self._classwise["val"].items()}),
        )

    def matcher_test_episodes(self, fold: int, shot: int, n_episodes: int, seed: int) -> list:
        """Matcher's DatasetLVIS under main_oss.py (`fix_randseed(seed)`, batch 1, 0 workers):
        episode idx takes class `idx % n`, the query by `np.random.choice(names, 1,
        replace=False)`, supports drawn the same way until `shot` differ from the query
        (repeats allowed); nothing else draws from numpy's global generator."""
        classes = self.classes_at(fold, shot)
        return class_cycle_episodes(self._classwise["val"], classes, shot, n_episodes, seed,
                                    f"LVIS-92i under {self.root}")  # fmt: skip


@DATASETS.register("lvis92i")
def lvis92i(data_root: str, **kwargs) -> Lvis92i:
    """LVIS-92i from Matcher's pickles (or the LVIS v1 JSON), COCO 2017 images (10 folds)."""
    return Lvis92i(data_root, **kwargs)
