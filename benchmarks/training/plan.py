"""The step plan of a training: every step's episodes and their augmentation parameters, drawn
up front in the main process from seeded generators, and the dataset that decodes step i (in a
DataLoader worker when there are any). Its content depends only on i, so any worker count gives
the same batches, and a resumed training continues the same plan."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fsbench.core import FsbenchError, seeded_rng
from fsbench.datasets.augment import AUGMENTATIONS
from fsbench.datasets.episodes import EpisodeLoader, EpisodeSpec, sample_episode


class ImageStep(NamedTuple):
    """One `sampler: images` step: training image ids and their augmentation parameters."""

    ids: tuple[str, ...]
    params: tuple | None


class EpisodeStream(torch.utils.data.Dataset):
    """Step i's episodes, decoded and augmented: a list of `Episode`s."""

    def __init__(self, loader: EpisodeLoader, plan: list, augmentation):
        self.loader, self.plan, self.augmentation = loader, plan, augmentation

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int):
        item = self.plan[index]
        if isinstance(item, ImageStep):
            augment = (self.augmentation, item.params) if item.params is not None else None
            return self.loader.load_images(item.ids, augment)
        return [
            self.loader.load(spec, (self.augmentation, params) if params is not None else None)
            for spec, params in self.plan[index]
        ]


def augmentation_rng(cfg, stage: tuple = ()):
    """The generator of the augmentation parameters (`flip` keeps the generator flips always
    drew from, so PANet's recipe draws the same flips as before it was a recipe)."""
    if cfg.augmentation == "none":
        return None
    if cfg.augmentation == "flip":
        return seeded_rng("train-flips", cfg.seed, *stage)
    return seeded_rng("train-augment", cfg.augmentation, cfg.seed, *stage)


def stage_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg, stage=()):
    """A stage's steps: episodes (`sampler: fsbench`, or `official`: the training protocol's
    lineage's class mix) or image batches (`sampler: images`); `stage` (its index and name when
    the training declares stages) joins their seeds."""
    if cfg.sampler == "images":
        return image_plan(dataset, split, train_classes, cfg, stage, protocol.min_object_pixels)
    if cfg.sampler == "official" and protocol.official_sampler in LINEAGE_WALKS:
        return lineage_plan(dataset, protocol, split, train_classes, way, shot, cfg, stage)
    return episode_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg, stage)


# How each lineage's training loader walks its list (PANet's draws a class uniformly, then
# images: fsbench's own sampler already does that).
#  - pfenet (util/dataset.py SemData; BAM trains through it): every image holding >= 2·32·32 px
#    of a training class once per epoch, shuffled; the query's class drawn uniformly among the
#    training classes it holds (any size); supports from that class's >= 2·32·32 px images.
#  - hsnet (data/pascal.py): every listed (image, class) pair once per epoch, shuffled; supports
#    drawn from the class's images until `shot` differ from the query (they may repeat).
LINEAGE_WALKS = {"pfenet": "pfenet", "hsnet": "hsnet", "patnet": "hsnet"}  # lineage → its walk
# (PATNet trains through HSNet's data/pascal.py)


def lineage_plan(dataset, protocol, split, train_classes, way, shot, cfg, stage=()) -> list:
    """Training steps drawn as the training protocol's lineage draws them (`sampler: official`),
    from one seeded generator: each epoch a fresh shuffle of the lineage's walk; a step takes
    the next `episodes_per_step` items."""
    lineage = LINEAGE_WALKS[protocol.official_sampler]
    if way != 1 or cfg.queries_per_way != 1:
        raise FsbenchError(
            f"train.sampler official: {lineage}'s training loader draws 1-way episodes with one "
            f"query; this cell is {way}-way with {cfg.queries_per_way} queries (use "
            "sampler: fsbench)"
        )
    big = protocol.min_object_pixels
    supports = {c: list(dataset.class_images(split, c, big)) for c in train_classes}
    usable = {c: set(images) for c, images in supports.items()}
    if lineage == "pfenet":
        held: dict[str, list[int]] = {}  # image → the training classes it holds (any size)
        for c in train_classes:
            for image in dataset.class_images(split, c, 1):
                held.setdefault(image, []).append(c)
        walk = sorted(set().union(*usable.values()))
    else:
        walk = [(image, c) for c in train_classes for image in dataset.class_images(split, c, 1)]
    if not walk:
        raise FsbenchError(
            f"train.sampler official: {dataset.name}/{split} has nothing to train on"
        )
    rng = seeded_rng("train-official", lineage, cfg.seed, dataset.name, shot, *stage)
    draw_rng = augmentation_rng(cfg, stage)
    augmentation = AUGMENTATIONS.build(cfg.augmentation)
    plan, order = [], []
    for _ in range(cfg.steps):
        step = []
        for _ in range(cfg.episodes_per_step):
            if not order:  # a new epoch: the DataLoader's shuffle
                order = [walk[i] for i in rng.permutation(len(walk))[::-1]]
            item = order.pop()
            if lineage == "pfenet":
                query = item
                classes = held[query]
                class_id = classes[int(rng.integers(len(classes)))]
            else:
                query, class_id = item
            pool = supports[class_id]  # never copied: a recipe draws ~10^6 episodes
            others = len(pool) - (query in usable[class_id])
            if others < (shot if lineage == "pfenet" else 1):
                raise FsbenchError(
                    f"train.sampler official: class {class_id} has {others} support image(s) "
                    f"besides the query in {dataset.name}/{split}; {shot}-shot needs more"
                )
            if lineage == "pfenet":  # distinct supports, none the query: a uniform draw
                extra = int(query in usable[class_id])  # of the others, in a random order
                drawn = (pool[i] for i in rng.choice(len(pool), size=shot + extra, replace=False))
                picked = [image for image in drawn if image != query][:shot]
            else:  # HSNet: each drawn until it differs from the query; they may repeat
                picked = []
                while len(picked) < shot:
                    image = pool[int(rng.integers(len(pool)))]
                    if image != query:
                        picked.append(image)
            spec = EpisodeSpec((class_id,), (tuple(picked),), (query,))
            params = None
            if draw_rng is not None:
                params = tuple(augmentation.draw(draw_rng) for _ in range(shot + 1))
            step.append((spec, params))
        plan.append(step)
    return plan


def image_plan(dataset, split, train_classes, cfg, stage=(), min_pixels=1) -> list[ImageStep]:
    """Batches of `cfg.images_per_step` training images holding a training class, each image
    once per epoch in an order shuffled per epoch by the seeded generator (as a base learner's
    DataLoader(shuffle=True) walks its list); a batch may run across an epoch's end."""
    pool = sorted(set().union(*(dataset.class_images(split, c, min_pixels) for c in train_classes)))
    if not pool:
        raise FsbenchError(
            f"sampler images: {dataset.name}/{split} has no image of the training classes"
        )
    rng = seeded_rng("train-images", cfg.seed, dataset.name, *stage)
    draw_rng = augmentation_rng(cfg, stage)
    augmentation = AUGMENTATIONS.build(cfg.augmentation)
    plan, order = [], []
    for _ in range(cfg.steps):
        ids = []
        while len(ids) < cfg.images_per_step:
            if not order:  # a new epoch
                order = [pool[i] for i in rng.permutation(len(pool))]
            ids.append(order.pop())
        params = None
        if draw_rng is not None:
            params = tuple(augmentation.draw(draw_rng) for _ in ids)
        plan.append(ImageStep(tuple(ids), params))
    return plan


def episode_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg, stage=()) -> list:
    """[[(EpisodeSpec, per-image augmentation parameters or None)] per step] of every training
    step (`cfg.episodes_per_step` episodes each), from the seeded generators, in order."""
    rng = seeded_rng("train-episodes", cfg.seed, dataset.name, fold, way, shot, *stage)
    draw_rng = augmentation_rng(cfg, stage)
    augmentation = AUGMENTATIONS.build(cfg.augmentation)
    plan = []
    for _ in range(cfg.steps):
        step = []
        for _ in range(cfg.episodes_per_step):
            spec = sample_episode(
                rng,
                dataset,
                split,
                train_classes,
                way,
                shot,
                cfg.queries_per_way,
                protocol.min_object_pixels,
            )
            images = sum(len(ids) for ids in spec.support) + len(spec.query)
            params = None
            if draw_rng is not None:
                params = tuple(augmentation.draw(draw_rng) for _ in range(images))
            step.append((spec, params))
        plan.append(step)
    return plan
