"""What every dataset is: the interface the engine reads, and the protocol switches a dataset owns.

A dataset class subclasses `FewShotDataset` and is registered by a builder function whose return
annotation names it (`@DATASETS.register() def my_set(data_root, **kw) -> MySet`), so the engine
knows its class — which lineages can replay its test episodes, how a protocol applies to it —
before opening any data. FSS-1000 (`datasets/fss.py`) is the worked example of a dataset added
as one file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from fsbench.core import FsbenchError


@dataclass(frozen=True)
class Replay:
    """Episodes as (classes, supports per class, queries) tuples, and the lists they came from."""

    episodes: tuple[tuple[tuple[int, ...], tuple[tuple[str, ...], ...], tuple[str, ...]], ...]
    lists: str  # "official files (...)", "shipped (...)" or "built (...)"
    lists_sha256: str  # of the per-class lists the draws index into


class FewShotDataset(ABC):
    """Images, per-class masks and class → image lists of one dataset root, split into folds.

    Class ids run 1…num_classes; image ids are strings the dataset resolves to files. The
    engine opens a dataset with `protocol=<name>` and calls only what is declared here.
    """

    name: str
    num_classes: int
    num_folds: int
    class_names: tuple[str, ...]
    # The layout family whose official test episodes datasets/replay.py knows ("pascal", "coco");
    # "" for a dataset that owns its replay (`official_episodes`) or has none.
    layout: str = ""
    # The lineages (Protocol.official_sampler) whose test script draws episodes on this dataset.
    replayed_by: frozenset[str] = frozenset()

    @classmethod
    def protocol_for(cls, protocol):
        """The preset as it applies to this dataset (e.g. PFENet tests COCO at 641 px)."""
        return protocol

    @classmethod
    def published_folds(cls, protocol, split_style: str | None = None):
        """(class names, test classes per fold, a heading or "") when the benchmark fixes them,
        so `fsbench list --dataset` needs no data; None when only the data can tell."""
        return None

    def official_episodes(self, protocol, fold, way, shot, n_episodes, seed, queries) -> Replay:
        """A dataset whose official episodes datasets/replay.py does not know draws them here."""
        raise FsbenchError(
            f"dataset {self.name!r} lists {protocol.official_sampler} in `replayed_by` but draws "
            "no official episodes (`official_episodes`); use sampler: fsbench"
        )

    # -- folds and splits -------------------------------------------------------------------
    @abstractmethod
    def check_fold(self, fold: int) -> None:
        """Raise a `DatasetError` naming the valid folds."""

    @abstractmethod
    def fold_classes(self, fold: int) -> list[int]:
        """The test (novel) classes of a fold."""

    def classes_at(self, fold: int, shot: int) -> list[int]:
        """The test classes of a fold at a shot (LVIS-92i's folds depend on it); those scored."""
        return self.fold_classes(fold)

    @abstractmethod
    def train_classes(self, fold: int) -> list[int]:
        """The training (base) classes of a fold."""

    @abstractmethod
    def train_split(self, protocol) -> str:
        """The split training episodes draw from under `protocol` (a `Protocol`)."""

    @abstractmethod
    def test_split(self, protocol) -> str:
        """The split test episodes draw from under `protocol`."""

    # -- lists --------------------------------------------------------------------------------
    @abstractmethod
    def list_ids(self, split: str) -> list[str]:
        """Every image id of a split, in a fixed order."""

    @abstractmethod
    def class_images(self, split: str, class_id: int, min_pixels: int = 1) -> list[str]:
        """The images of a split holding at least `min_pixels` of the class, in a fixed order."""

    @abstractmethod
    def fingerprint(self, split: str, min_pixels: int = 1) -> str:
        """sha256 over everything the split's episodes are drawn from."""

    # -- pixels -------------------------------------------------------------------------------
    @abstractmethod
    def load_image(self, image_id: str) -> np.ndarray:
        """H×W×3 uint8 RGB."""

    @abstractmethod
    def load_masks(self, image_id: str, classes) -> tuple[np.ndarray, np.ndarray]:
        """Per-class boolean masks [len(classes), H, W] and the void mask [H, W]."""

    @abstractmethod
    def instance_masks(self, image_id: str, class_id: int) -> list[np.ndarray]:
        """The class's objects as separate boolean masks (weak annotations are made from them)."""


def class_cycle_episodes(lists: dict, classes: list, shot: int, n_episodes: int, seed: int,
                         where: str) -> list[tuple]:  # fmt: skip
    """The draws of HSNet's family of test loaders that walk classes (PATNet's cross-domain sets,
    Matcher's LVIS-92i) under `fix_randseed(seed)`, batch 1, 0 workers: episode `idx` takes class
    `classes[idx % n]`, the query by `np.random.choice(names, 1, replace=False)`, then supports
    drawn the same way until `shot` differ from the query (they may repeat); nothing else draws
    from numpy's global generator between episodes. `lists`: class → image ids in the official
    order; `where` names the data in the error when a class has no second image."""
    rs = np.random.RandomState(seed)
    episodes = []
    for idx in range(n_episodes):
        class_id = classes[idx % len(classes)]
        names = list(lists[class_id])
        if len(set(names)) < 2:
            raise FsbenchError(
                f"{where} class {class_id}: the official sampler needs two images of a class (a "
                f"support that differs from the query); it has {len(names)}"
            )
        query = names[int(rs.choice(len(names), 1, replace=False)[0])]
        supports: list[str] = []
        while len(supports) < shot:
            candidate = names[int(rs.choice(len(names), 1, replace=False)[0])]
            if candidate != query:
                supports.append(candidate)
        episodes.append(((class_id,), (tuple(supports),), (query,)))
    return episodes


class OneObjectClass:
    """Masks of a dataset whose images each show one class (FSS-1000, the cross-domain sets):
    `foreground(image_id)` (a boolean mask) and `class_of(image_id)` give every mask."""

    def load_masks(self, image_id: str, classes) -> tuple[np.ndarray, np.ndarray]:
        """Per-class masks: the object for the image's own class, empty for others; no void."""
        mask, own = self.foreground(image_id), self.class_of(image_id)
        masks = np.stack([mask if c == own else np.zeros_like(mask) for c in classes])
        return masks, np.zeros_like(mask)

    def instance_masks(self, image_id: str, class_id: int) -> list[np.ndarray]:
        from scipy import ndimage

        mask = self.load_masks(image_id, [class_id])[0][0]
        components, count = ndimage.label(mask, structure=np.ones((3, 3)))
        return [components == i for i in range(1, count + 1)]
