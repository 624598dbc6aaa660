"""Episode records, fixed fingerprinted episode manifests, and episode assembly."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsbench.core import (  # noqa: F401
    FsbenchError,
    atomic_write_text,
    canonical_sha256,
    manifest_fingerprint,
    seeded_rng,
)
from fsbench.datasets.augment import augmented_views, label_of
from fsbench.datasets.cache import ByteLRU
from fsbench.datasets.protocols import check_sampler
from fsbench.datasets.replay import official_episodes
from fsbench.datasets.resize import (  # noqa: F401 (IMAGENET_*, normalise re-exported)
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_resize,
    content_size,
    fit,
    normalise,
)
from fsbench.datasets.weak import box_masks, scribble

MANIFEST_VERSION = 1


@dataclass
class Episode:
    """One N-way K-shot episode as tensors (support_fg/bg already derived from the annotation)."""

    class_ids: list[int]
    support_images: torch.Tensor  # [N, K, 3, H, W] normalised
    support_fg: torch.Tensor  # [N, K, H, W] float 0/1
    support_bg: torch.Tensor  # [N, K, H, W] float 0/1
    query_images: torch.Tensor  # [Q, 3, H, W]
    query_labels: torch.Tensor  # [Q, H, W] long: 0 bg, i for the i-th class, 255 ignore
    support_ids: list[list[str]] = field(default_factory=list)
    query_ids: list[str] = field(default_factory=list)

    @property
    def way(self) -> int:
        return len(self.class_ids)

    @property
    def shot(self) -> int:
        return self.support_images.shape[1]

    def to(self, device, non_blocking: bool = False) -> Episode:
        moved = {
            k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in vars(self).items()
        }
        return Episode(**moved)

    def pin_memory(self) -> Episode:
        """Page-locked copies (a DataLoader with pin_memory calls this), for async copies."""
        pinned = {
            k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()
        }
        return Episode(**pinned)


@dataclass(frozen=True)
class EpisodeSpec:
    """The ids of one episode: N classes, K support ids per class, the query ids."""

    classes: tuple[int, ...]
    support: tuple[tuple[str, ...], ...]
    query: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "classes": list(self.classes),
            "support": [list(s) for s in self.support],
            "query": list(self.query),
        }


def sample_episode(rng, dataset, split, classes_pool, way, shot, queries_per_way, min_pixels=1):
    """Draw one episode: `way` distinct classes, then per class `shot` supports and queries.

    Every image of an episode is distinct, so supports never repeat and never contain the query.
    """
    if way > len(classes_pool):
        raise FsbenchError(
            f"{way}-way episodes need {way} classes; the fold has {len(classes_pool)}"
        )
    classes = [int(c) for c in rng.choice(np.asarray(classes_pool), size=way, replace=False)]
    used: set[str] = set()
    supports, query = [], []
    for class_id in classes:
        pool = [i for i in dataset.class_images(split, class_id, min_pixels) if i not in used]
        need = shot + queries_per_way
        if len(pool) < need:
            raise FsbenchError(
                f"class {class_id} has {len(pool)} free images in {dataset.name}/{split}; "
                f"a {way}-way {shot}-shot episode needs {need}; lower the shot or use more data"
            )
        picked = [pool[i] for i in rng.choice(len(pool), size=need, replace=False)]
        used.update(picked)
        supports.append(tuple(picked[:shot]))
        query.extend(picked[shot:])
    return EpisodeSpec(tuple(classes), tuple(supports), tuple(query))


@dataclass(frozen=True)
class EpisodeManifest:
    """The fixed episodes of one (dataset, split, fold, way, shot, count, seed, protocol)."""

    spec: dict
    episodes: tuple[EpisodeSpec, ...]

    @classmethod
    def build(
        cls,
        dataset,
        protocol,
        fold,
        way,
        shot,
        n_episodes,
        seed,
        queries_per_way=1,
        sampler: str | None = None,
    ):
        """The episodes of one setting. `sampler` "official" (the default of a named protocol)
        replays the protocol's own test script (datasets/replay.py); "fsbench" draws with
        fsbench's sampler, seeded by the whole spec."""
        sampler = check_sampler(sampler, protocol, dataset)
        split = dataset.test_split(protocol)
        min_pixels = protocol.min_object_pixels
        spec = {
            "version": MANIFEST_VERSION,
            "dataset": dataset.name,
            "dataset_fingerprint": dataset.fingerprint(split, min_pixels),
            "split": split,
            "fold": fold,
            "way": way,
            "shot": shot,
            "queries_per_way": queries_per_way,
            "n_episodes": n_episodes,
            "seed": seed,
            "protocol": protocol.name,
        }
        if shot < 1 or way < 1 or n_episodes < 1 or queries_per_way < 1:
            raise FsbenchError(
                f"impossible episode setting {spec}: way, shot, episodes must be ≥ 1"
            )
        if sampler == "official":
            replay = official_episodes(
                dataset, protocol, fold, way, shot, n_episodes, seed, queries_per_way
            )
            # Version 2: the manifest names its sampler and lists. A version-1 manifest (no
            # `sampler` key) was drawn by fsbench's sampler, as fsbench-sampled ones still are.
            spec.update(
                version=2,
                sampler=f"official:{protocol.official_sampler}",
                lists=replay.lists,
                lists_sha256=replay.lists_sha256,
            )
            episodes = tuple(EpisodeSpec(*episode) for episode in replay.episodes)
            return cls(spec, episodes)
        rng = seeded_rng(spec)
        pool = dataset.fold_classes(fold)
        episodes = tuple(
            sample_episode(rng, dataset, split, pool, way, shot, queries_per_way, min_pixels)
            for _ in range(n_episodes)
        )
        return cls(spec, episodes)

    @property
    def sampler(self) -> str:
        """ "official:<lineage>" or "fsbench" (manifests without the key predate the replay)."""
        return self.spec.get("sampler", "fsbench")

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.spec, [e.to_json() for e in self.episodes])

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            **self.spec,
            "episodes": [e.to_json() for e in self.episodes],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, raw: dict, source: str = "manifest") -> EpisodeManifest:
        """A manifest from its JSON form; a fingerprint that does not match is an error."""
        try:
            episodes = tuple(
                EpisodeSpec(
                    tuple(int(c) for c in e["classes"]),
                    tuple(tuple(str(i) for i in s) for s in e["support"]),
                    tuple(str(i) for i in e["query"]),
                )
                for e in raw["episodes"]
            )
            spec = {k: v for k, v in raw.items() if k not in ("fingerprint", "episodes")}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise FsbenchError(f"{source}: not a valid episode manifest ({error!r})") from None
        manifest = cls(spec, episodes)
        if raw.get("fingerprint") and raw["fingerprint"] != manifest.fingerprint:
            raise FsbenchError(
                f"{source}: fingerprint does not match its episodes (file was edited)"
            )
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike, dataset=None) -> EpisodeManifest:
        """Read a manifest file (e.g. one a paper published) and check it is intact and usable."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise FsbenchError(f"{path}: not a readable episode manifest ({error})") from None
        manifest = cls.from_json(raw, str(path))
        spec, episodes = manifest.spec, manifest.episodes
        if dataset is not None:
            known = set(dataset.list_ids(spec.get("split", "trainaug")))
            unknown = sorted({i for e in episodes for i in (*e.query, *sum(e.support, ()))} - known)
            if unknown:
                raise FsbenchError(
                    f"{path}: {len(unknown)} image ids are not in the dataset's "
                    f"{spec.get('split')} list (first: {unknown[0]}); wrong --data-root?"
                )
        return manifest


ANNOTATIONS = ("mask", "scribble", "bbox")


class EpisodeLoader:
    """Turns episode specs into `Episode` tensors at the input size. Decoded, resized images are
    kept as uint8 (4× smaller than the normalised floats) and masks as bools, each cache bounded
    in bytes (LRU). `annotation` decides what the support masks are: dense masks, scribbles or
    boxes derived from them (weak supports, seeded by `weak_seed`)."""

    def __init__(
        self,
        dataset,
        input_size: int,
        annotation: str = "mask",
        weak_seed: int = 0,
        cache_bytes: int = 1 << 30,
        resize: str = "square",
    ):
        if annotation not in ANNOTATIONS:
            raise FsbenchError(f"annotation {annotation!r} is not one of {', '.join(ANNOTATIONS)}")
        check_resize(resize)
        self.dataset = dataset
        self.input_size = input_size
        self.annotation = annotation
        self.weak_seed = weak_seed
        self.cache_bytes = cache_bytes
        self.resize = resize
        self._images = ByteLRU(cache_bytes // 2)
        self._masks = ByteLRU(cache_bytes // 2)

    def annotated(self, annotation: str, weak_seed: int = 0) -> EpisodeLoader:
        """The same loader (sharing decoded images and masks) with another support annotation."""
        other = EpisodeLoader(
            self.dataset, self.input_size, annotation, weak_seed, self.cache_bytes, self.resize
        )
        other._images, other._masks = self._images, self._masks
        return other

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the image content inside the S×S input; the rest is padding."""
        return content_size(height, width, self.input_size, self.resize)

    def _fit(self, array: np.ndarray, resample, fill) -> np.ndarray:
        return fit(array, self.input_size, self.resize, resample, fill)

    def _resize_mask(self, mask: np.ndarray, fill: int = 0) -> np.ndarray:
        return self._fit(mask.astype(np.uint8), Image.NEAREST, fill) > 0

    def image(self, image_id: str) -> torch.Tensor:
        """Normalised image [3, S, S]; padding (keep_ratio_pad) is raw black before normalising,
        as PFENet pads its float pixels with zeros and normalises after."""
        pixels = self._images.get(
            image_id, lambda: self._fit(self.dataset.load_image(image_id), Image.BILINEAR, 0)
        )
        return normalise(pixels)

    def masks(self, image_id: str, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class masks [N, S, S] and void mask [S, S] (nearest resize; padding is void)."""
        masks, void, _ = self._masks_and_content(image_id, classes)
        return masks, void

    def _masks_and_content(self, image_id: str, classes):
        """masks, void and the (h, w) of the image inside the input (the rest is padding)."""

        def make():
            masks, void = self.dataset.load_masks(image_id, list(classes))
            return (
                torch.from_numpy(np.stack([self._resize_mask(m) for m in masks])),
                torch.from_numpy(self._resize_mask(void, fill=1)),
                self.content_size(*void.shape),
            )

        return self._masks.get((image_id, tuple(classes)), make)

    def support_masks(
        self, image_id: str, index: int, classes
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Foreground / background of the support for classes[index] under the annotation."""
        masks, _, (height, width) = self._masks_and_content(image_id, classes)
        # Background: pixels of none of the episode's classes (the void outline included, as
        # PANet's getMask), never the padding: it is not part of the image.
        fg, bg = masks[index], ~masks.any(0)
        bg[height:], bg[:, width:] = False, False
        if self.annotation == "scribble":
            rng = seeded_rng("scribble", self.weak_seed, image_id, int(classes[index]))
            fg = torch.from_numpy(scribble(fg.numpy(), rng))
            bg = torch.from_numpy(scribble(bg.numpy(), rng))
        elif self.annotation == "bbox":
            instances = [
                self._resize_mask(m)
                for m in self.dataset.instance_masks(image_id, int(classes[index]))
            ]
            fg, bg = (torch.from_numpy(m) for m in box_masks(instances, tuple(fg.shape)))
        return fg, bg

    def support_key(self, image_id: str, index: int, classes) -> tuple:
        """What `support_masks(image_id, index, classes)` depends on: equal keys, equal masks."""
        seed = self.weak_seed if self.annotation == "scribble" else None
        return (image_id, index, tuple(int(c) for c in classes), self.annotation, seed)

    def query_label(self, image_id: str, classes) -> torch.Tensor:
        """[S, S] long: 0 background, i for the i-th episode class, 255 void."""
        return label_of(*self.masks(image_id, classes))

    def load_masks(self, spec: EpisodeSpec):
        """Support fg / bg [N, K, S, S] (float) and query labels [Q, S, S] of an episode, without
        its images (the evaluator's path when the features are cached)."""
        classes = list(spec.classes)
        fg, bg = [], []
        for index, ids in enumerate(spec.support):
            pairs = [self.support_masks(i, index, classes) for i in ids]
            fg.append(torch.stack([f for f, _ in pairs]))
            bg.append(torch.stack([b for _, b in pairs]))
        labels = torch.stack([self.query_label(i, classes) for i in spec.query])
        return torch.stack(fg).float(), torch.stack(bg).float(), labels

    def load(self, spec: EpisodeSpec, augment=None) -> Episode:
        """Assemble an episode; `augment` (training) is (an `Augmentation`, one parameter per
        image: supports class by class, then queries), as the step plan drew them."""
        classes = list(spec.classes)
        augmentation, params = augment if augment is not None else (None, None)
        drawn = iter(params) if params is not None else None

        def views(image_id, masks_of):
            """(image, *masks) of one image, augmented when the plan says so."""
            param = next(drawn) if drawn is not None else None
            if augmentation is None:
                return (self.image(image_id), *masks_of(None))
            if augmentation.raw_pixels:
                raw = augmented_views(
                    self.dataset, image_id, classes, augmentation, param, self.input_size
                )
                tensors = (raw[0], *masks_of(raw[1:]))
            else:
                tensors = (self.image(image_id), *masks_of(None))
            return augmentation.tensors(tensors, param)

        def support(image_id, index):
            def masks_of(raw):
                if raw is None:
                    return self.support_masks(image_id, index, classes)
                masks, _, padding = raw
                return masks[index], ~masks.any(0) & ~padding

            return views(image_id, masks_of)

        def query(image_id):
            def masks_of(raw):
                if raw is None:
                    return (self.query_label(image_id, classes),)
                masks, void, padding = raw
                return (label_of(masks, void | padding),)

            return views(image_id, masks_of)

        support_images, support_fg, support_bg = [], [], []
        for index, ids in enumerate(spec.support):
            row = [support(i, index) for i in ids]
            support_images.append(torch.stack([image for image, _, _ in row]))
            support_fg.append(torch.stack([fg for _, fg, _ in row]).float())
            support_bg.append(torch.stack([bg for _, _, bg in row]).float())
        queries = [query(i) for i in spec.query]
        return Episode(
            class_ids=classes,
            support_images=torch.stack(support_images),
            support_fg=torch.stack(support_fg),
            support_bg=torch.stack(support_bg),
            query_images=torch.stack([image for image, _ in queries]),
            query_labels=torch.stack([label for _, label in queries]),
            support_ids=[list(s) for s in spec.support],
            query_ids=list(spec.query),
        )
