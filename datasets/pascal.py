"""PASCAL-5i on the real VOC2012 + SBD-aug layout (VOCdevkit/VOC2012/...)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError, atomic_write_text, canonical_sha256, default_cache_dir
from fsbench.datasets.base import FewShotDataset
from fsbench.datasets.registry import DATASETS

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
EXPECTED_LAYOUT = (
    "expected VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png, "
    "ImageSets/Segmentation/{train,val,trainaug}.txt} under --data-root"
)
INDEX_VERSION = 2
LISTS = Path(__file__).parent / "lists"
# Training lists of the protocols that are published files, not ImageSets lists (datasets/lists/):
# PFENet's de-duplicated VOC + SBD list; HSNet's trn fold lists (`<id>__<class>` pairs: a class
# trains only on the images listed with it).
SHIPPED_TRAIN_LISTS = {
    "pfenet_noduplicate": ("pfenet/pascal/voc_sbd_merge_noduplicate.txt",),
    "hsnet_trn": tuple(f"hsnet/pascal/trn/fold{fold}.txt" for fold in range(4)),
}


class IndexLock:
    """A lock around building a split's class index: the evaluator decodes images in threads, and
    the first ones may all ask for the index at once. Pickles (to DataLoader workers) afresh."""

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._lock = threading.Lock()


class DatasetError(FsbenchError):
    """Bad dataset input: the message names the path, what is wrong and the expected layout."""


def check_file_name(name: str, where: str) -> str:
    """A file name from a list or annotation file: one plain path component, so that no entry
    (`../../outside/secret`, `/etc/passwd`) reads outside the dataset's folders."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DatasetError(
            f"{where}: entry {name!r} is not a plain file name (no folders or '..'); fix or "
            "remove that line"
        )
    return name


def file_stamp(path: Path) -> list[int]:
    """(size, mtime ns, inode, ctime ns): changes when a file is edited, replaced or swapped with
    another — also when its mtime was put back (`touch -r`): only the kernel sets ctime."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image fully (a truncated file raises here, not later) as HxWx3 uint8."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file is missing") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"{path}: unreadable or truncated image ({error}); re-extract it"
        ) from None


class Pascal5i(FewShotDataset):
    """Images, masks and class → image lists of one VOC root; folds follow Shaban et al. (OSLSM)."""

    name = "pascal5i"
    num_classes = 20
    num_folds = 4
    class_names = VOC_CLASSES
    layout = "pascal"
    replayed_by = frozenset({"panet", "pfenet", "hsnet"})

    @classmethod
    def published_folds(cls, protocol, split_style=None):
        return VOC_CLASSES, [list(range(5 * f + 1, 5 * f + 6)) for f in range(4)], ""

    def __init__(
        self,
        data_root: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        protocol: str = "panet",
    ):
        root = Path(data_root).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: dataset folder does not exist; {EXPECTED_LAYOUT}")
        candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
        voc = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
        if voc is None:
            raise DatasetError(f"{root}: no JPEGImages/ folder found; {EXPECTED_LAYOUT}")
        for sub in ("SegmentationClassAug", "ImageSets/Segmentation"):
            if not (voc / sub).is_dir():
                raise DatasetError(f"{voc / sub}: missing subfolder; {EXPECTED_LAYOUT}")
        self.root = voc.resolve()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "index"
        self._index: dict[str, dict] = {}
        self._index_lock = IndexLock()
        self._pairs: dict[str, set | None] = {}
        self._train_lists: dict[str, str] = {}

    # -- folds ------------------------------------------------------------------------------
    def fold_classes(self, fold: int) -> list[int]:
        """Test classes of fold i: 5i+1 … 5i+5."""
        self.check_fold(fold)
        return list(range(5 * fold + 1, 5 * fold + 6))

    def train_classes(self, fold: int) -> list[int]:
        held_out = set(self.fold_classes(fold))
        return [c for c in range(1, self.num_classes + 1) if c not in held_out]

    def check_fold(self, fold: int) -> None:
        if not isinstance(fold, int) or not 0 <= fold < self.num_folds:
            raise DatasetError(f"fold {fold!r} is outside 0…{self.num_folds - 1} for {self.name}")

    def train_split(self, protocol) -> str:
        """The protocol's training list. A shipped list (PFENet's, HSNet's) applies when the
        dataset holds all its images; on other data (generated sets) training uses `trainaug`
        (each training records the list it used)."""
        name = protocol.pascal_train_list
        if name not in SHIPPED_TRAIN_LISTS:
            return name
        if name not in self._train_lists:  # checked once (validation asks again and again)
            ids = self._shipped_ids(name)
            present = sum(self.mask_path(i).is_file() for i in ids)
            if present * 2 > len(ids) and present < len(ids):
                raise DatasetError(
                    f"{self.root}: {len(ids) - present} of the {len(ids)} images of the "
                    f"{name} training list are missing; complete SegmentationClassAug/"
                )
            self._train_lists[name] = name if present == len(ids) else "trainaug"
        return self._train_lists[name]

    def _shipped_pairs(self, split: str) -> list[tuple[str, int | None]]:
        pairs = []
        for relative in SHIPPED_TRAIN_LISTS[split]:
            for line in (LISTS / relative).read_text().splitlines():
                if "__" in line:  # HSNet: <id>__<class>
                    image_id, class_id = line.split("__")
                    pairs.append((image_id, int(class_id)))
                elif line.strip():  # PFENet: JPEGImages/<id>.jpg SegmentationClassAug/<id>.png
                    pairs.append((Path(line.split()[0]).stem, None))
        return pairs

    def _shipped_ids(self, split: str) -> list[str]:
        return sorted({image_id for image_id, _ in self._shipped_pairs(split)})

    def test_split(self, protocol) -> str:
        return protocol.pascal_test_list

    def load_masks(self, image_id: str, classes) -> tuple[np.ndarray, np.ndarray]:
        """Per-class masks [N, H, W] (bool) of `classes` and the void (255) mask [H, W]."""
        label = self.load_label(image_id)
        return np.stack([label == c for c in classes]), label == 255

    def instance_masks(self, image_id: str, class_id: int) -> list[np.ndarray]:
        """The instances of a class: from SegmentationObjectAug when present (as PANet's box
        supports), else the connected components of the class mask."""
        mask = self.load_label(image_id) == class_id
        path = self.root / "SegmentationObjectAug" / f"{image_id}.png"
        if path.is_file():
            with Image.open(path) as objects:
                objects = np.asarray(objects)
            ids = [i for i in np.unique(objects[mask]) if i not in (0, 255)]
            return [(objects == i) & mask for i in ids]
        from scipy import ndimage

        components, count = ndimage.label(mask, structure=np.ones((3, 3)))
        return [components == i for i in range(1, count + 1)]

    # -- files ------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def list_ids(self, split: str) -> list[str]:
        if split in SHIPPED_TRAIN_LISTS:
            return self._shipped_ids(split)
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise DatasetError(f"{path}: image list is missing; {EXPECTED_LAYOUT}")
        # Sorted, never file or directory order: episodes must not depend on the machine.
        ids = {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
        return sorted(check_file_name(i, str(path)) for i in ids)

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def load_label(self, image_id: str) -> np.ndarray:
        """The class label map, HxW uint8: 0 background, 1…20, 255 void."""
        path = self.mask_path(image_id)
        try:
            with Image.open(path) as mask:
                if mask.mode not in ("P", "L"):
                    raise DatasetError(
                        f"{path}: mask has mode {mask.mode}; expected a palette (P) PNG of class "
                        "indices as in SegmentationClassAug"
                    )
                label = np.asarray(mask)
        except FileNotFoundError:
            raise DatasetError(f"{path}: mask file is missing") from None
        except (OSError, SyntaxError) as error:
            raise DatasetError(f"{path}: unreadable mask ({error})") from None
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes + 1), 255])
        if bad.size:
            raise DatasetError(
                f"{path}: mask has labels {bad.tolist()} outside 0…{self.num_classes} and 255; "
                "use SegmentationClassAug (class indices), not colour or instance PNGs"
            )
        return label

    # -- class index ------------------------------------------------------------------------
    def class_index(self, split: str) -> dict[int, dict[str, int]]:
        """class → {image id: pixel count}, built from the masks once and cached on disk."""
        if split not in self._index:
            with self._index_lock:
                if split not in self._index:
                    self._index[split] = self._build_class_index(split)
        return self._index[split]

    def _build_class_index(self, split: str) -> dict[int, dict[str, int]]:
        ids = self.list_ids(split)
        missing = [
            i for i in ids if not self.image_path(i).is_file() or not self.mask_path(i).is_file()
        ]
        if missing:
            which = (
                self.image_path(missing[0])
                if not self.image_path(missing[0]).is_file()
                else (self.mask_path(missing[0]))
            )
            raise DatasetError(
                f"{which}: listed in ImageSets/Segmentation/{split}.txt but missing "
                f"({len(missing)} ids in all); {EXPECTED_LAYOUT}"
            )
        # Keyed on every mask's and image's (size, mtime, inode, ctime): an edited, replaced or
        # swapped file (equal sizes, mtime put back) rebuilds the index, never keeps stale lists.
        stamps = [[file_stamp(self.mask_path(i)), file_stamp(self.image_path(i))] for i in ids]
        key = canonical_sha256(
            {"v": INDEX_VERSION, "root": str(self.root), "split": split, "ids": ids, "st": stamps}
        )
        cache_file = self.cache_dir / f"{self.name}-{split}-{key[:16]}.json"
        if cache_file.is_file():
            raw = json.loads(cache_file.read_text())
        else:
            raw = {str(c): {} for c in range(1, self.num_classes + 1)}
            for image_id in ids:
                label = self.load_label(image_id)
                self._check_same_size(image_id, label.shape)
                values, counts = np.unique(label, return_counts=True)
                for value, count in zip(values.tolist(), counts.tolist()):
                    if 1 <= value <= self.num_classes:
                        raw[str(value)][image_id] = count
            atomic_write_text(cache_file, json.dumps(raw))
        return {int(c): dict(sorted(images.items())) for c, images in raw.items()}

    def _check_same_size(self, image_id: str, label_shape) -> None:
        """An image and its mask must have one size: a mask at another size would be resized
        onto the image independently and scored against the wrong pixels."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError):
            return  # undecodable: named when an episode loads it, failing only its cells
        if (height, width) != tuple(label_shape):
            raise DatasetError(
                f"{path}: image is {width}×{height} but its mask {self.mask_path(image_id)} is "
                f"{label_shape[1]}×{label_shape[0]}; each mask must match its image's size "
                "(re-extract the pair)"
            )

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        """Sorted ids of the split's images with at least `min_pixels` pixels of the class."""
        images = [i for i, n in self.class_index(split)[class_id].items() if n >= min_pixels]
        pairs = self._listed_pairs(split)
        if pairs is not None:
            images = [i for i in images if (i, class_id) in pairs]
        return images

    def _listed_pairs(self, split: str) -> set | None:
        """HSNet's (image, class) pairs of a pair list; None for plain image lists."""
        if split not in SHIPPED_TRAIN_LISTS:
            return None
        if split not in self._pairs:
            pairs = self._shipped_pairs(split)
            self._pairs[split] = None if pairs[0][1] is None else set(pairs)
        return self._pairs[split]

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        """sha256 of the split's class → image lists: equal data gives equal episodes anywhere."""
        lists = {c: self.class_images(split, c, min_pixels) for c in range(1, self.num_classes + 1)}
        return canonical_sha256({"dataset": self.name, "split": split, "lists": lists})


@DATASETS.register("pascal5i")
def pascal5i(data_root: str, **kwargs) -> Pascal5i:
    """PASCAL-5i from a local VOC2012 + SBD-aug folder."""
    return Pascal5i(data_root, **kwargs)
