"""Novel-class leakage into training (BAM, Lang et al. CVPR 2022): training images of a fold that
hold pixels of the fold's test classes (labelled background while training), their count and
pixel share under each protocol's training list; the filter that drops them
(`train.exclude_novel_images`); and the same count from the shipped lists alone."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from fsbench.core import canonical_sha256

LISTS = Path(__file__).resolve().parent / "lists"


def _class_pixels(dataset, split: str) -> dict[int, dict[str, int]] | None:
    """class → {image id: pixels} of a split (PASCAL-layout datasets); None where the dataset
    keeps no per-image pixel counts."""
    index = getattr(dataset, "class_index", None)
    if index is None:
        return None
    table = index(split)
    if not table or not all(isinstance(k, int) for k in table):
        return None
    return table


def novel_images(dataset, split: str, fold: int) -> set[str]:
    """Ids of the split's images holding any pixel of the fold's test classes."""
    table = _class_pixels(dataset, split) or {}
    return {i for c in dataset.fold_classes(fold) for i in table.get(c, {})}


def training_images(dataset, split: str, fold: int, min_pixels: int) -> set[str]:
    """The images training episodes of the fold can draw (a training class, enough pixels)."""
    return {
        i for c in dataset.train_classes(fold) for i in dataset.class_images(split, c, min_pixels)
    }


def audit(dataset, protocol, fold: int) -> dict | None:
    """One fold under one protocol's training list: training images, those holding novel-class
    pixels, and the novel pixels' share of them (pooled); None where the dataset keeps no pixel
    counts."""
    split = dataset.train_split(protocol)
    table = _class_pixels(dataset, split)
    if table is None:
        return None
    usable = training_images(dataset, split, fold, protocol.min_object_pixels)
    leaking = sorted(usable & novel_images(dataset, split, fold))
    novel = sum(table.get(c, {}).get(i, 0) for i in leaking for c in dataset.fold_classes(fold))
    total = sum(_pixels(dataset, i) for i in leaking)
    return {
        "dataset": dataset.name,
        "fold": fold,
        "protocol": protocol.name,
        "train_list": split,
        "train_images": len(usable),
        "with_novel_pixels": len(leaking),
        "share_of_images": 100 * len(leaking) / max(len(usable), 1),
        "novel_pixel_share": 100 * novel / total if total else 0.0,
        "novel_classes": ",".join(map(str, dataset.fold_classes(fold))),
    }


def _pixels(dataset, image_id: str) -> int:
    """An image's pixel count from its label file's header (no decoding) where there is one."""
    mask_path = getattr(dataset, "mask_path", None)
    if mask_path is not None:
        from PIL import Image

        with Image.open(mask_path(image_id)) as label:
            width, height = label.size
        return width * height
    return int(dataset.load_label(image_id).size)


class WithoutNovelImages:
    """A dataset view whose `class_images` leave out the given images (BAM's filter: training
    never sees a novel-class pixel, not even as background); everything else is the dataset's."""

    def __init__(self, dataset, excluded: set[str]):
        self._dataset, self.excluded = dataset, frozenset(excluded)

    def __getattr__(self, name):
        if name == "_dataset":  # being unpickled (a DataLoader worker): not set yet
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        images = self._dataset.class_images(split, class_id, min_pixels)
        return [i for i in images if i not in self.excluded]

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        lists = {
            c: self.class_images(split, c, min_pixels)
            for c in range(1, self._dataset.num_classes + 1)
        }
        return canonical_sha256({"dataset": self.name, "split": split, "lists": lists})


class ShippedPascalLists:
    """The leakage the shipped PASCAL lists show on their own, no images needed: HSNet's
    `trn/fold{i}.txt` pair every SBD-aug training image with each class it holds (built by HSNet
    from the real labels), so an image listed under fold f's classes *and* another fold's is a
    training image of test fold f holding novel-class pixels."""

    @cached_property
    def pairs(self) -> dict[int, set[str]]:
        """fold → ids of the images HSNet lists with a class of that fold."""
        folds = {}
        for fold in range(4):
            text = (LISTS / "hsnet" / "pascal" / "trn" / f"fold{fold}.txt").read_text()
            folds[fold] = {line.split("__")[0] for line in text.split()}
        return folds

    @cached_property
    def pfenet(self) -> set[str]:
        text = (LISTS / "pfenet" / "pascal" / "voc_sbd_merge_noduplicate.txt").read_text()
        return {line.split()[0].rsplit("/", 1)[-1].rsplit(".", 1)[0] for line in text.splitlines()}

    def rows(self) -> list[dict]:
        """Per fold, for HSNet's training list and for PFENet's (its class membership read off
        HSNet's pairs; PFENet's 2·32·32-pixel rule needs the labels and is not applied)."""
        rows = []
        for fold in range(4):
            novel = self.pairs[fold]
            training = set().union(*(self.pairs[f] for f in range(4) if f != fold))
            for name, images in (
                ("hsnet_trn", training),
                ("pfenet_noduplicate", training & self.pfenet),
            ):
                leaking = images & novel
                rows.append(
                    {
                        "fold": fold,
                        "train_list": name,
                        "train_images": len(images),
                        "with_novel_pixels": len(leaking),
                        "share_of_images": 100 * len(leaking) / max(len(images), 1),
                    }
                )
        return rows
