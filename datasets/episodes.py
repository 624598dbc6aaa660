"""Episode records and episode assembly (`EpisodeLoader`: ids → tensors at a protocol's geometry);
the manifests live in manifests.py and are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fsbench.core import FsbenchError, seeded_rng
from fsbench.datasets.augment import augmented_views, label_of
from fsbench.datasets.cache import ByteLRU
from fsbench.datasets.manifests import (  # noqa: F401 (re-exported)
    MANIFEST_VERSION,
    EpisodeManifest,
    EpisodeSpec,
    sample_episode,
)
from fsbench.datasets.resize import (  # noqa: F401 (IMAGENET_*, normalise re-exported)
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_resize,
    content_size,
    fit,
    normalise,
)
from fsbench.datasets.weak import box_masks, scribble


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
    # [Q, H, W] long, for methods declaring `base_class_labels`: the query's full label map over
    # the fold's training classes (1…B in ascending class-id order; novel classes and background
    # 0; void 255), under the same augmentation as the image. None otherwise.
    query_base_labels: torch.Tensor | None = None
    # The fold's training classes in that order (label i of query_base_labels is the i-th).
    base_class_ids: list[int] = field(default_factory=list)

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


@dataclass
class ImageBatch:
    """A batch of training images with their base-class labels (a `sampler: images` step, as a
    base learner trains): images [B, 3, H, W], labels [B, H, W] long (1…B over the fold's
    training classes in ascending id order, 0 background and novel classes, 255 void)."""

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: list[str] = field(default_factory=list)

    def to(self, device, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            list(self.image_ids),
        )

    def pin_memory(self) -> ImageBatch:
        return ImageBatch(self.images.pin_memory(), self.labels.pin_memory(), self.image_ids)


ANNOTATIONS = ("mask", "scribble", "bbox")


class EpisodeLoader:
    """Turns episode specs into `Episode` tensors at the input size. Decoded, resized images are
    kept as the resize gives them (uint8, 4× smaller than the normalised floats; float pixels
    under keep_ratio_pad, as PFENet's pipeline) and masks as bools, each cache bounded
    in bytes (LRU). `annotation` decides what the support masks are: dense masks, scribbles or
    boxes derived from them (weak supports, seeded by `weak_seed`). With `base_classes` (the
    fold's training classes), episodes carry `query_base_labels` and image batches load."""

    def __init__(
        self,
        dataset,
        input_size: int,
        annotation: str = "mask",
        weak_seed: int = 0,
        cache_bytes: int = 1 << 30,
        resize: str = "square",
        base_classes=None,
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
        self.base_classes = sorted(int(c) for c in base_classes) if base_classes else None
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

        def views(image_id, masks_of, of_classes=classes):
            """(image, *masks) of one image, augmented when the plan says so."""
            param = next(drawn) if drawn is not None else None
            if augmentation is None:
                return (self.image(image_id), *masks_of(None))
            if augmentation.raw_pixels:
                raw = augmented_views(
                    self.dataset, image_id, of_classes, augmentation, param, self.input_size
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

        base = self.base_classes
        # the episode's classes, then the training classes it does not hold (base labels)
        labelled = classes + [c for c in base if c not in classes] if base else classes

        def query(image_id):
            def masks_of(raw):
                if raw is None:
                    masks, void = self.masks(image_id, labelled)
                else:
                    masks, void, padding = raw
                    void = void | padding
                labels = (label_of(masks[: len(classes)], void),)
                if base:
                    order = [labelled.index(c) for c in base]
                    labels += (label_of(masks[order], void),)
                return labels

            return views(image_id, masks_of, labelled)

        support_images, support_fg, support_bg = [], [], []
        for index, ids in enumerate(spec.support):
            row = [support(i, index) for i in ids]
            support_images.append(torch.stack([image for image, _, _ in row]))
            support_fg.append(torch.stack([fg for _, fg, _ in row]).float())
            support_bg.append(torch.stack([bg for _, _, bg in row]).float())
        queries = [query(i) for i in spec.query]
        base_labels = torch.stack([q[2] for q in queries]) if base else None

        def stacked(rows):  # an image batch (load_images) has no supports
            return torch.stack(rows) if rows else torch.empty(0)

        return Episode(
            class_ids=classes,
            support_images=stacked(support_images),
            support_fg=stacked(support_fg),
            support_bg=stacked(support_bg),
            query_images=torch.stack([q[0] for q in queries]),
            query_labels=torch.stack([q[1] for q in queries]),
            support_ids=[list(s) for s in spec.support],
            query_ids=list(spec.query),
            query_base_labels=base_labels,
            base_class_ids=list(base) if base else [],
        )

    def load_images(self, image_ids, augment=None) -> ImageBatch:
        """Training images with their base-class labels (`base_classes` must be set), under
        the step plan's augmentation parameters (one per image)."""
        if not self.base_classes:
            raise FsbenchError(
                "sampler images needs base-class labels: the method must declare "
                "base_class_labels = True"
            )
        spec = EpisodeSpec((), (), tuple(image_ids))
        episode = self.load(spec, augment)
        return ImageBatch(episode.query_images, episode.query_base_labels, list(image_ids))
