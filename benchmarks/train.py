"""Episodic training (PANet's recipe as config values, not constants), deterministic per seed."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fsbench.datasets.episodes import EpisodeLoader, sample_episode, seeded_rng
from fsbench.datasets.registry import FsbenchError


@dataclass(frozen=True)
class TrainConfig:
    """PANet's defaults: SGD 1e-3, momentum 0.9, wd 5e-4, ×0.1 at 10k/20k, 30k steps, flips."""

    steps: int = 30000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[int, ...] = (10000, 20000)
    lr_gamma: float = 0.1
    flip: bool = True
    seed: int = 0
    queries_per_way: int = 1
    # Checkpoint selection on classes held out of the training classes (never the test classes).
    val_classes: int = 0
    val_every: int = 1000
    val_episodes: int = 100
    log_every: int = 10

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} (must be ≥ 1)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if any(m <= 0 for m in self.lr_milestones):
            problems.append(f"lr_milestones={list(self.lr_milestones)} (must be > 0)")
        if self.val_classes < 0 or self.val_every < 1 or self.val_episodes < 1:
            problems.append("val_classes ≥ 0, val_every ≥ 1 and val_episodes ≥ 1 are required")
        if problems:
            raise FsbenchError("impossible training setting: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclass
class TrainResult:
    state_dict: dict
    curve: list[dict] = field(default_factory=list)  # step, total and per-term loss, lr
    validation: list[dict] = field(default_factory=list)  # step, val mIoU
    best_step: int | None = None
    seconds: float = 0.0
    train_classes: list[int] = field(default_factory=list)
    val_classes: list[int] = field(default_factory=list)


def split_validation_classes(train_classes, cfg: TrainConfig, fold: int):
    """Deterministically hold `cfg.val_classes` of the training classes out for validation."""
    if cfg.val_classes >= len(train_classes):
        raise FsbenchError(
            f"val_classes={cfg.val_classes} leaves no training class "
            f"(the fold has {len(train_classes)})"
        )
    order = seeded_rng("validation-classes", cfg.seed, fold).permutation(len(train_classes))
    held = sorted(train_classes[i] for i in order[: cfg.val_classes])
    return [c for c in train_classes if c not in held], held


def train(
    model,
    dataset,
    protocol,
    fold,
    way,
    shot,
    cfg: TrainConfig,
    input_size,
    device="cpu",
    progress=None,
) -> TrainResult:
    """Train `model` on episodes of the fold's training classes; returns the selected weights."""
    if not model.trainable:
        raise FsbenchError(f"{type(model).__name__} does not train")
    started = time.perf_counter()
    split = dataset.train_split(protocol)
    train_classes, val_classes = split_validation_classes(dataset.train_classes(fold), cfg, fold)
    loader = EpisodeLoader(dataset, input_size, resize=protocol.resize)
    rng = seeded_rng("train-episodes", cfg.seed, dataset.name, fold, way, shot)
    flip_rng = seeded_rng("train-flips", cfg.seed) if cfg.flip else None
    model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(cfg.lr_milestones), cfg.lr_gamma
    )
    result = TrainResult(state_dict={}, train_classes=train_classes, val_classes=val_classes)
    best = -np.inf
    running: dict[str, float] = {}
    for step in range(1, cfg.steps + 1):
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
        episode = loader.load(spec, flip_rng).to(device)
        losses = model.loss(episode)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            count = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            result.curve.append(
                {
                    "step": step,
                    "lr": scheduler.get_last_lr()[0],
                    **{k: v / count for k, v in running.items()},
                }
            )
            running = {}
        if val_classes and (step % cfg.val_every == 0 or step == cfg.steps):
            score = validate(model, loader, dataset, protocol, val_classes, way, shot, cfg, device)
            result.validation.append({"step": step, "miou": score})
            if score > best:
                best, result.best_step = score, step
                result.state_dict = copy.deepcopy(model.state_dict())
            model.train()
        if progress is not None:
            progress(step, cfg.steps)
    if not val_classes:
        result.best_step = cfg.steps
        result.state_dict = model.state_dict()
    result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def validate(model, loader, dataset, protocol, val_classes, way, shot, cfg, device) -> float:
    """mIoU on a fixed episode list of the held-out training classes."""
    from fsbench.benchmarks.metrics import SegmentationMeter

    model.eval()
    rng = seeded_rng("validation-episodes", cfg.seed, val_classes, way, shot)
    meter = SegmentationMeter(val_classes)
    for index in range(cfg.val_episodes):
        spec = sample_episode(
            rng,
            dataset,
            dataset.train_split(protocol),
            val_classes,
            min(way, len(val_classes)),
            shot,
            1,
            protocol.min_object_pixels,
        )
        episode = loader.load(spec).to(device)
        prediction = model(episode).argmax(1)
        for query in range(prediction.shape[0]):
            meter.update(prediction[query], episode.query_labels[query], spec.classes, index)
    return meter.miou()
