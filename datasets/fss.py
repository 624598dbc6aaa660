"""FSS-1000 (Li et al., CVPR 2020): 1000 classes, ten images each, `<class>/<n>.jpg` with a binary
`<n>.png` mask, and the 520 / 240 / 240 train / val / test class splits HSNet publishes (shipped in
datasets/lists/hsnet/fss/). One fold: the 240 test classes; class ids follow HSNet (train 1…520,
val 521…760, test 761…1000, each split in sorted name order). Image ids are `<class>/<n>`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError, canonical_sha256
from fsbench.datasets.base import FewShotDataset, OneObjectClass, Replay
from fsbench.datasets.pascal import DatasetError, check_file_name, read_rgb
from fsbench.datasets.registry import DATASETS
from fsbench.datasets.synthetic import ensure_generated, finish_image, render_scene
from fsbench.datasets.synthetic_coco import coco_class_style

LISTS = Path(__file__).parent / "lists" / "hsnet" / "fss"
SPLITS = ("trn", "val", "test")
# Test episodes per protocol on FSS-1000: HSNet's test loader walks its 240 × 10 test images.
TEST_EPISODES = {"hsnet": 2400, "patnet": 2400, "matcher": 2400}  # (PATNet's, Matcher's: HSNet's)
EXPECTED_LAYOUT = (
    "expected FSS-1000/<class>/<n>.jpg with a binary <n>.png mask beside each image (n = 1…10), "
    "class folders named as in HSNet's splits, under --data-root"
)


def split_classes() -> dict[str, list[str]]:
    """HSNet's class names per split, sorted as its DatasetFSS sorts them."""
    return {s: sorted((LISTS / f"{s}.txt").read_text().split("\n")[:-1]) for s in SPLITS}


class Fss1000(OneObjectClass, FewShotDataset):
    """The class folders of the splits found under the root (a generated set holds a subset)."""

    name = "fss1000"
    num_classes = 1000
    num_folds = 1
    class_names = tuple(n for s in SPLITS for n in split_classes()[s])  # HSNet's class ids
    # HSNet's test.py and PATNet's (its data/fss.py is HSNet's); PANet, PFENet never tested on it
    replayed_by = frozenset({"hsnet", "patnet", "matcher"})

    @classmethod
    def protocol_for(cls, protocol):
        """The protocol's FSS-1000 episode count (HSNet: every test image once)."""
        if protocol.name in TEST_EPISODES:
            return dataclasses.replace(protocol, episodes=TEST_EPISODES[protocol.name])
        return protocol

    @classmethod
    def published_folds(cls, protocol, split_style=None):
        return cls.class_names, [list(range(761, 1001))], ""  # HSNet's 240 test classes

    def official_episodes(self, protocol, fold, way, shot, n_episodes, seed, queries) -> Replay:
        self.check_fold(fold)
        episodes = self.hsnet_test_episodes(shot, n_episodes, seed)
        ids = self.list_ids(self.test_split(protocol))
        source = "HSNet's test split (class folders found)"
        return Replay(tuple(episodes), source, canonical_sha256(ids))

    def __init__(self, data_root, protocol: str = "hsnet", cache_dir=None):
        root = Path(data_root).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: dataset folder does not exist; {EXPECTED_LAYOUT}")
        self.root = (root / "FSS-1000" if (root / "FSS-1000").is_dir() else root).resolve()
        if (self.root / "data").is_dir() and not (self.root / "abacus").is_dir():
            self.root = self.root / "data"  # Matcher's and GF-SAM's layout: FSS-1000/data/<class>
        self.splits = split_classes()
        self._ids = {n: i for i, n in enumerate(self.class_names, start=1)}
        present = {
            n
            for n in self.class_names
            if (self.root / check_file_name(n, "HSNet's split")).is_dir()
        }
        if not present:
            raise DatasetError(f"{self.root}: no class folder of FSS-1000; {EXPECTED_LAYOUT}")
        self._present = present
        self._pixels: dict[str, int] = {}
        self._files: dict[int, list[str]] = {}  # class → image ids, listed once

    # -- folds and splits ---------------------------------------------------------------------
    def check_fold(self, fold: int) -> None:
        if fold != 0:
            raise DatasetError(f"fold {fold!r}: FSS-1000 has one fold (0: its 240 test classes)")

    def _split_ids(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise DatasetError(f"split {split!r} of FSS-1000 is not one of {SPLITS}")
        return [self._ids[n] for n in self.splits[split] if n in self._present]

    def fold_classes(self, fold: int) -> list[int]:
        self.check_fold(fold)
        return self._split_ids("test")

    def train_classes(self, fold: int) -> list[int]:
        self.check_fold(fold)
        return self._split_ids("trn")

    def train_split(self, protocol) -> str:
        return "trn"

    def test_split(self, protocol) -> str:
        return "test"

    # -- files ----------------------------------------------------------------------------------
    def class_of(self, image_id: str) -> int:
        return self._ids[image_id.split("/")[0]]

    def _path(self, image_id: str, suffix: str) -> Path:
        name, _, number = image_id.partition("/")
        check_file_name(name, "image id")
        return self.root / name / f"{check_file_name(number, 'image id')}{suffix}"

    def image_path(self, image_id: str) -> Path:
        return self._path(image_id, ".jpg")

    def mask_path(self, image_id: str) -> Path:
        return self._path(image_id, ".png")

    def class_files(self, class_id: int) -> list[str]:
        """The class's image ids in HSNet's order: sorted file paths (1, 10, 2, … 9)."""
        if class_id not in self._files:  # the sampler asks once per class and episode
            name = self.class_names[class_id - 1]
            files = sorted(p.name for p in (self.root / name).glob("*.jpg"))
            self._files[class_id] = [f"{name}/{Path(f).stem}" for f in files]
        return list(self._files[class_id])

    def list_ids(self, split: str) -> list[str]:
        return [i for c in self._split_ids(split) for i in self.class_files(c)]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def foreground(self, image_id: str) -> np.ndarray:
        """HSNet's reading: the mask as greyscale, ≥ 128 is the object."""
        path = self.mask_path(image_id)
        try:
            with Image.open(path) as mask:
                return np.asarray(mask.convert("L")) >= 128
        except FileNotFoundError:
            raise DatasetError(f"{path}: mask file is missing; {EXPECTED_LAYOUT}") from None
        except (OSError, SyntaxError) as error:
            raise DatasetError(f"{path}: unreadable mask ({error})") from None

    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        if class_id not in self._split_ids(split):
            return []
        ids = self.class_files(class_id)
        if min_pixels <= 1:
            return ids
        for image_id in ids:
            if image_id not in self._pixels:
                self._pixels[image_id] = int(self.foreground(image_id).sum())
        return [i for i in ids if self._pixels[i] >= min_pixels]

    def hsnet_test_episodes(self, shot: int, n_episodes: int, seed: int) -> list[tuple]:
        """HSNet's data/fss.py under its test.py (fix_randseed(seed), loader in order): each test
        image once as the query (then again from the start past them), supports numbered 1…10
        drawn with `np.random.choice(range(1, 11), 1, replace=False)` until `shot` differ from
        the query (repeats allowed). Episodes as (classes, supports, queries) tuples."""
        rs = np.random.RandomState(seed)
        queries = self.list_ids("test")
        episodes = []
        for idx in range(n_episodes):
            query = queries[idx % len(queries)]
            name = query.split("/")[0]
            supports: list[str] = []
            while len(supports) < shot:
                candidate = f"{name}/{1 + int(rs.choice(10, 1, replace=False)[0])}"
                if candidate != query:
                    supports.append(candidate)
            episodes.append(((self.class_of(query),), (tuple(supports),), (query,)))
        missing = sorted({i for e in episodes for i in e[1][0] if not self.image_path(i).is_file()})
        if missing:
            raise FsbenchError(
                f"{self.image_path(missing[0])}: HSNet's FSS-1000 sampler draws supports 1…10 of "
                "each class; the class has fewer images"
            )
        return episodes

    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        lists = {c: self.class_images(split, c, min_pixels) for c in self._split_ids(split)}
        return canonical_sha256({"dataset": self.name, "split": split, "lists": lists})


def write_fss(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    """`root/FSS-1000`: n_images / 10 classes (two thirds from HSNet's train split, the rest from
    its test split, first names in sorted order), ten images each, one object per image."""
    n_classes = max(2, n_images // 10)
    splits = split_classes()
    n_test = max(1, n_classes // 3)
    names = splits["trn"][: n_classes - n_test] + splits["test"][:n_test]
    folder = Path(root) / "FSS-1000"
    for index, name in enumerate(names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for number in range(1, 11):
            rng = np.random.default_rng([seed, index, number])
            size = (image_size, image_size)
            image, objects = render_scene(rng, size, image_size, [1 + index % 80], coco_class_style)
            mask = objects[0][1] if objects else np.zeros((image_size, image_size), bool)
            Image.fromarray(finish_image(image, rng)).save(
                folder / name / f"{number}.jpg", quality=92
            )
            Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(
                folder / name / f"{number}.png"
            )
    return folder


@DATASETS.register("fss1000")
def fss1000(data_root: str, **kwargs) -> Fss1000:
    """FSS-1000 from a local folder (<class>/<n>.jpg and .png), HSNet's class splits."""
    return Fss1000(data_root, **kwargs)


@DATASETS.register("synthetic_fss1000")
def synthetic_fss1000(
    data_root: str | None = None, n_images: int = 300, image_size: int = 96, seed: int = 0, **kwargs
) -> Fss1000:
    """Generated FSS-1000-layout data (n_images / 10 classes of HSNet's names), cached."""
    cache = Path(data_root) if data_root else None
    if n_images < 20:
        raise FsbenchError("synthetic_fss1000 needs n_images ≥ 20 (ten images per class)")
    return Fss1000(ensure_generated("fss", write_fss, n_images, image_size, seed, cache), **kwargs)
