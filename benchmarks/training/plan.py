"""The step plan of a training: every step's episodes and their augmentation parameters, drawn
up front in the main process from seeded generators, and the dataset that decodes step i (in a
DataLoader worker when there are any). Its content depends only on i, so any worker count gives
the same batches, and a resumed training continues the same plan."""

from __future__ import annotations

import torch

from fsbench.core import seeded_rng
from fsbench.datasets.augment import AUGMENTATIONS
from fsbench.datasets.episodes import EpisodeLoader, sample_episode


class EpisodeStream(torch.utils.data.Dataset):
    """Step i's episodes, decoded and augmented: a list of `Episode`s."""

    def __init__(self, loader: EpisodeLoader, plan: list, augmentation):
        self.loader, self.plan, self.augmentation = loader, plan, augmentation

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int):
        return [
            self.loader.load(spec, (self.augmentation, params) if params is not None else None)
            for spec, params in self.plan[index]
        ]


def augmentation_rng(cfg):
    """The generator of the augmentation parameters (`flip` keeps the generator flips always
    drew from, so PANet's recipe draws the same flips as before it was a recipe)."""
    if cfg.augmentation == "none":
        return None
    if cfg.augmentation == "flip":
        return seeded_rng("train-flips", cfg.seed)
    return seeded_rng("train-augment", cfg.augmentation, cfg.seed)


def episode_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg) -> list:
    """[[(EpisodeSpec, per-image augmentation parameters or None)] per step] of every training
    step (`cfg.episodes_per_step` episodes each), from the seeded generators, in order."""
    rng = seeded_rng("train-episodes", cfg.seed, dataset.name, fold, way, shot)
    draw_rng = augmentation_rng(cfg)
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
