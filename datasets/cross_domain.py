"""The cross-domain test sets of PATNet's benchmark (Lei et al., ECCV 2022, slei109/PATNet): a
model trained on PASCAL is tested on satellite tiles (Deepglobe), skin lesions (ISIC 2018) and
chest X-rays, each in the layout PATNet's data/*.py reads, and FSS-1000 (datasets/fss.py):

    Deepglobe/<c>/test/origin/<stem>.jpg   Deepglobe/<c>/test/groundtruth/<stem>.png   c = 1…6
    ISIC/ISIC2018_Task1-2_Training_Input/<c>/<ID>.jpg
    ISIC/ISIC2018_Task1_Training_GroundTruth/<ID>_segmentation.png                    c = 1…3
    LungSegmentation/CXR_png/<id>.png   LungSegmentation/masks/<id>_mask.png           one class

One fold (0) of test classes each; nothing here is trained on. Image ids: `<c>/<stem>` (Deepglobe,
ISIC) and the mask's stem (`<id>_mask`, chest X-ray, as PATNet lists the masks). Masks are read
as PATNet reads them (greyscale, ≥ 128 is the object) after a check that they hold only 0 and 255:
a mask with other values (a JPEG-compressed or colour-coded file) is refused, not thresholded.

`fsbench prepare deepglobe|isic2018 RAW OUT` builds the first two from the official downloads
(datasets/cross_domain_prepare.py), as PATNet's data/preprocess.py and DR-Adapter's ISIC split
do.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError, canonical_sha256
from fsbench.datasets.base import FewShotDataset, OneObjectClass, Replay, class_cycle_episodes
from fsbench.datasets.pascal import DatasetError, check_file_name, read_rgb
from fsbench.datasets.registry import DATASETS
from fsbench.datasets.synthetic import ensure_generated, finish_image, render_scene
from fsbench.datasets.synthetic_coco import coco_class_style

PATNET_EPISODES = 600  # data/{deepglobe,isic,lung}.py: num=600


def _official_names(folder: Path, extension: str) -> list[Path]:
    """PATNet's listing: `sorted(glob(folder/*))`, kept when the name's second dot-separated
    part is `extension` (`os.path.basename(p).split('.')[1] == 'jpg'`)."""
    if not folder.is_dir():
        return []
    kept = []
    for path in sorted(str(p) for p in folder.iterdir()):
        parts = os.path.basename(path).split(".")
        if len(parts) > 1 and parts[1] == extension:
            kept.append(Path(path))
    return kept


class CrossDomainSet(OneObjectClass, FewShotDataset):
    """A test-only set: class folders (or one class), one fold, PATNet's episodes."""

    num_folds = 1
    replayed_by = frozenset({"patnet"})
    layout_text = ""  # the expected layout, for error messages
    folder = ""  # the set's folder under a shared data root (PATNet's datapath)
    item = ""  # what one listed file is, for error messages ("Deepglobe tile")
    listed = "image"  # the side PATNet lists ("mask": the chest X-rays); the other must exist

    def __init__(self, data_root, protocol: str = "patnet", cache_dir=None):
        root = Path(data_root).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: dataset folder does not exist; {self.layout_text}")
        self.root = (root / self.folder if (root / self.folder).is_dir() else root).resolve()
        self._lists = self._build_lists()  # class id → image ids, in PATNet's order
        if not any(self._lists.values()):
            raise DatasetError(f"{self.root}: no image of {self.name}; {self.layout_text}")
        for image_id in (i for ids in self._lists.values() for i in ids):
            self._check_pair(image_id)
        self._class_of = {i: c for c, ids in self._lists.items() for i in ids}
        self._checked: set[str] = set()

    def _check_pair(self, image_id: str) -> None:
        """The file PATNet's loader opens beside a listed one is there (one line if not)."""
        image, mask = self.image_path(image_id), self.mask_path(image_id)
        if self.listed == "image" and not mask.is_file():
            raise DatasetError(f"{image}: {self.item} without its mask {mask}; {self.layout_text}")
        if self.listed == "mask" and not image.is_file():
            raise DatasetError(
                f"{mask}: {self.item} whose image {image} is missing; {self.layout_text}"
            )

    @abstractmethod
    def _build_lists(self) -> dict[int, list[str]]:
        """Class id → image ids in PATNet's order (its sorted listing of one side)."""

    @abstractmethod
    def image_path(self, image_id: str) -> Path: ...

    @abstractmethod
    def mask_path(self, image_id: str) -> Path: ...

    # -- folds and splits ---------------------------------------------------------------------
    def check_fold(self, fold: int) -> None:
        if fold != 0:
            raise DatasetError(
                f"fold {fold!r}: {self.name} has one fold (0: its {self.num_classes} test "
                "classes); models are trained on another dataset"
            )

    def fold_classes(self, fold: int) -> list[int]:
        self.check_fold(fold)
        return [c for c in range(1, self.num_classes + 1) if self._lists.get(c)]

    def train_classes(self, fold: int) -> list[int]:
        self.check_fold(fold)
        return []  # a test set: PATNet trains on PASCAL (all 20 classes)

    def train_split(self, protocol) -> str:
        return "test"

    def test_split(self, protocol) -> str:
        return "test"

    def list_ids(self, split: str) -> list[str]:
        return [i for c in sorted(self._lists) for i in self._lists[c]]

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        ids = list(self._lists.get(class_id, []))
        if min_pixels <= 1:
            return ids
        return [i for i in ids if int(self.foreground(i).sum()) >= min_pixels]

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        lists = {c: self.class_images(split, c, min_pixels) for c in sorted(self._lists)}
        return canonical_sha256({"dataset": self.name, "split": split, "lists": lists})

    # -- files ----------------------------------------------------------------------------------
    def class_of(self, image_id: str) -> int:
        if image_id not in self._class_of:
            raise DatasetError(f"{image_id!r}: not an image id of {self.name} under {self.root}")
        return self._class_of[image_id]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def foreground(self, image_id: str) -> np.ndarray:
        """PATNet's reading (greyscale, ≥ 128 is the object) of a mask checked to hold 0/255."""
        path = self.mask_path(image_id)
        try:
            with Image.open(path) as picture:
                picture.load()
                values = np.asarray(picture.convert("RGB") if picture.mode == "P" else picture)
                grey = np.asarray(picture.convert("L"))
        except FileNotFoundError:
            raise DatasetError(f"{path}: mask file is missing; {self.layout_text}") from None
        except (OSError, SyntaxError) as error:
            raise DatasetError(f"{path}: unreadable mask ({error})") from None
        if image_id not in self._checked:
            odd = np.setdiff1d(np.unique(values), (0, 255))
            if odd.size:
                raise DatasetError(
                    f"{path}: a binary mask holds only 0 and 255, this one also "
                    f"{', '.join(str(v) for v in odd[:4])}{' …' if odd.size > 4 else ''} (a "
                    "compressed or colour-coded file?); write it again from the original "
                    "annotation (`fsbench prepare` does)"
                )
            self._checked.add(image_id)
        return grey >= 128

    # -- PATNet's test episodes -------------------------------------------------------------------
    def official_episodes(self, protocol, fold, way, shot, n_episodes, seed, queries) -> Replay:
        self.check_fold(fold)
        return Replay(
            tuple(self.patnet_test_episodes(shot, n_episodes, seed)),
            f"PATNet's listing of {self.root.name} (sorted glob per class)",
            canonical_sha256({str(c): v for c, v in sorted(self._lists.items())}),
        )

    def patnet_test_episodes(self, shot: int, n_episodes: int, seed: int) -> list[tuple]:
        """PATNet's data/{deepglobe,isic,lung}.py under its test.py (`fix_randseed(seed)`, a
        loader in order with 0 workers): episode `idx` takes class `idx % n_classes`, the query
        by `np.random.choice(list, 1, replace=False)`, then supports drawn the same way until
        `shot` differ from the query (repeats allowed). Nothing else draws from numpy's global
        generator between episodes (torchvision's Resize and the model do not)."""
        classes = sorted(self._lists)  # PATNet's categories, '1'…'n', in order
        return class_cycle_episodes(self._lists, classes, shot, n_episodes, seed,
                                    f"{self.name} under {self.root}")  # fmt: skip


class Deepglobe(CrossDomainSet):
    name = "deepglobe"
    num_classes = 6
    # PATNet's preprocess.py labelset, read with cv2 (BGR): 1 agriculture, 2 urban, 3 rangeland,
    # 4 forest, 5 water, 6 barren
    class_names = ("agriculture", "urban", "rangeland", "forest", "water", "barren")
    layout_text = (
        "expected Deepglobe/<c>/test/origin/<stem>.jpg with Deepglobe/<c>/test/groundtruth/"
        "<stem>.png (c = 1…6, PATNet's tiles; `fsbench prepare deepglobe RAW OUT` makes them)"
    )

    folder, item = "Deepglobe", "Deepglobe tile"

    def _build_lists(self) -> dict[int, list[str]]:
        return {
            c: [
                f"{c}/{p.stem}"
                for p in _official_names(self.root / str(c) / "test" / "origin", "jpg")
            ]
            for c in range(1, 7)
        }

    def _parts(self, image_id: str) -> tuple[str, str]:
        folder, _, stem = image_id.partition("/")
        return check_file_name(folder, "image id"), check_file_name(stem, "image id")

    def image_path(self, image_id: str) -> Path:
        folder, stem = self._parts(image_id)
        return self.root / folder / "test" / "origin" / f"{stem}.jpg"

    def mask_path(self, image_id: str) -> Path:
        folder, stem = self._parts(image_id)
        return self.root / folder / "test" / "groundtruth" / f"{stem}.png"


ISIC_INPUT, ISIC_TRUTH = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
# DR-Adapter's split script (PATNet does not say which folder is which lesion type)
ISIC_CLASSES = {"seborrheic_keratosis": 1, "nevus": 2, "melanoma": 3}


class Isic2018(CrossDomainSet):
    name = "isic2018"
    num_classes = 3
    class_names = ("seborrheic keratosis", "nevus", "melanoma")
    layout_text = (
        f"expected ISIC/{ISIC_INPUT}/<c>/<ID>.jpg (c = 1…3 by lesion type) with "
        f"ISIC/{ISIC_TRUTH}/<ID>_segmentation.png (`fsbench prepare isic2018 RAW OUT` makes them)"
    )

    folder, item = "ISIC", "ISIC image"

    def _build_lists(self) -> dict[int, list[str]]:
        return {
            c: [f"{c}/{p.stem}" for p in _official_names(self.root / ISIC_INPUT / str(c), "jpg")]
            for c in range(1, 4)
        }

    def image_path(self, image_id: str) -> Path:
        folder, _, stem = image_id.partition("/")
        return self.root / ISIC_INPUT / check_file_name(folder, "image id") / f"{stem}.jpg"

    def mask_path(self, image_id: str) -> Path:
        stem = check_file_name(image_id.partition("/")[2], "image id")
        return self.root / ISIC_TRUTH / f"{stem}_segmentation.png"


class ChestXray(CrossDomainSet):
    name = "chest_xray"
    num_classes = 1
    class_names = ("lung",)
    layout_text = (
        "expected LungSegmentation/masks/<id>_mask.png with LungSegmentation/CXR_png/<id>.png "
        "(the Kaggle 'chest-xray-masks-and-labels' set); images without a mask are not used"
    )

    folder, item, listed = "LungSegmentation", "chest X-ray mask", "mask"

    def _build_lists(self) -> dict[int, list[str]]:
        """PATNet's data/lung.py: the episodes run over the masks; the image is CXR_png/ + the
        mask's name less its last 9 characters (`_mask.png`) + `.png`."""
        return {1: [p.stem for p in _official_names(self.root / "masks", "png")]}

    def image_path(self, image_id: str) -> Path:
        name = check_file_name(image_id, "image id") + ".png"
        return self.root / "CXR_png" / (name[:-9] + ".png")

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{check_file_name(image_id, 'image id')}.png"


# -- generated versions (tests, smoke grids), written in exactly those layouts --------------------


def _scene(rng, image_size: int, class_index: int):
    size = (image_size, image_size)
    image, objects = render_scene(rng, size, image_size, [1 + class_index % 80], coco_class_style)
    mask = objects[0][1] if objects else np.zeros(size, bool)
    if not mask.any():  # every test image shows its class
        mask[image_size // 4 : image_size // 2, image_size // 4 : image_size // 2] = True
    return finish_image(image, rng), (mask * 255).astype(np.uint8)


def write_deepglobe(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    folder = Path(root) / "Deepglobe"
    for index in range(n_images):
        class_id = 1 + index % 6
        image, mask = _scene(np.random.default_rng([seed, index]), image_size, class_id)
        stem = f"{100 + index // 6}_{index % 6}{index % 5}"
        (folder / str(class_id) / "test" / "origin").mkdir(parents=True, exist_ok=True)
        (folder / str(class_id) / "test" / "groundtruth").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(class_id) / "test" / "origin" / f"{stem}.jpg")
        rgb = np.repeat(mask[..., None], 3, axis=2)  # PATNet's masks: RGB, 0 or 255
        Image.fromarray(rgb).save(folder / str(class_id) / "test" / "groundtruth" / f"{stem}.png")
    return folder


def write_isic(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    folder = Path(root) / "ISIC"
    (folder / ISIC_TRUTH).mkdir(parents=True, exist_ok=True)
    for index in range(n_images):
        class_id = 1 + index % 3
        image, mask = _scene(np.random.default_rng([seed, index]), image_size, class_id)
        stem = f"ISIC_{index:07d}"
        (folder / ISIC_INPUT / str(class_id)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / ISIC_INPUT / str(class_id) / f"{stem}.jpg")
        Image.fromarray(mask, mode="L").save(folder / ISIC_TRUTH / f"{stem}_segmentation.png")
    return folder


def write_chest(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    folder = Path(root) / "LungSegmentation"
    (folder / "CXR_png").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(n_images):
        image, mask = _scene(np.random.default_rng([seed, index]), image_size, 0)
        stem = f"CHNCXR_{index:04d}_{index % 2}"
        Image.fromarray(image.mean(axis=2).astype(np.uint8), mode="L").save(
            folder / "CXR_png" / f"{stem}.png"
        )
        Image.fromarray(mask, mode="L").save(folder / "masks" / f"{stem}_mask.png")
    # an image without a mask, as in the real set: never part of an episode
    Image.fromarray(np.zeros((image_size, image_size), np.uint8), mode="L").save(
        folder / "CXR_png" / "MCUCXR_9999_0.png"
    )
    return folder


def _generated(kind, writer, cls, data_root, n_images, image_size, seed, kwargs):
    if n_images < 2 * cls.num_classes:
        raise FsbenchError(f"synthetic_{cls.name} needs n_images ≥ {2 * cls.num_classes}")
    cache = Path(data_root) if data_root else None
    return cls(ensure_generated(kind, writer, n_images, image_size, seed, cache), **kwargs)


@DATASETS.register("deepglobe")
def deepglobe(data_root: str, **kwargs) -> Deepglobe:
    """Deepglobe land-cover tiles in PATNet's layout (6 classes, test only)."""
    return Deepglobe(data_root, **kwargs)


@DATASETS.register("isic2018")
def isic2018(data_root: str, **kwargs) -> Isic2018:
    """ISIC 2018 Task 1 lesions split by type in PATNet's layout (3 classes, test only)."""
    return Isic2018(data_root, **kwargs)


@DATASETS.register("chest_xray")
def chest_xray(data_root: str, **kwargs) -> ChestXray:
    """The chest X-ray lung masks PATNet tests on (1 class, test only)."""
    return ChestXray(data_root, **kwargs)


@DATASETS.register("synthetic_deepglobe")
def synthetic_deepglobe(
    data_root: str | None = None, n_images: int = 60, image_size: int = 64, seed: int = 0, **kw
) -> Deepglobe:
    """Generated Deepglobe-layout tiles (RGB 0/255 masks), cached."""
    return _generated("deepglobe", write_deepglobe, Deepglobe, data_root, n_images, image_size,
                      seed, kw)  # fmt: skip


@DATASETS.register("synthetic_isic2018")
def synthetic_isic2018(
    data_root: str | None = None, n_images: int = 30, image_size: int = 64, seed: int = 0, **kw
) -> Isic2018:
    """Generated ISIC-layout lesions (class folders, `_segmentation.png` masks), cached."""
    return _generated("isic", write_isic, Isic2018, data_root, n_images, image_size, seed, kw)


@DATASETS.register("synthetic_chest_xray")
def synthetic_chest_xray(
    data_root: str | None = None, n_images: int = 20, image_size: int = 64, seed: int = 0, **kw
) -> ChestXray:
    """Generated chest-X-ray-layout images and `_mask.png` masks, cached."""
    return _generated("chest", write_chest, ChestXray, data_root, n_images, image_size, seed, kw)
