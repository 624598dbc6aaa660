"""Episodic training (PANet's recipe as config values, not constants), deterministic per seed."""

from __future__ import annotations

import copy
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.metrics import SegmentationMeter
from fsbench.benchmarks.training.optim import (
    step_losses,
    train_mode,
)
from fsbench.benchmarks.training.plan import EpisodeStream, stage_plan
from fsbench.benchmarks.training.stages import Stages
from fsbench.core import FsbenchError, atomic_write_bytes, seeded_rng
from fsbench.datasets.augment import AUGMENTATIONS
from fsbench.datasets.episodes import EpisodeLoader, ImageBatch, sample_episode
from fsbench.datasets.leakage import WithoutNovelImages, novel_images, training_images
from fsbench.methods.base import labels_of


@dataclass
class TrainResult:
    state_dict: dict
    curve: list[dict] = field(default_factory=list)  # step, total and per-term loss, lr
    curve_times: list[int] = field(default_factory=list)  # wall clock (epoch ms) of each point
    validation: list[dict] = field(default_factory=list)  # step, val mIoU
    best_step: int | None = None
    seconds: float = 0.0
    train_classes: list[int] = field(default_factory=list)
    val_classes: list[int] = field(default_factory=list)
    resumed_from: int = 0  # the step a resumed training restarted after (0: from scratch)
    train_list: str = ""  # the dataset list the episodes were drawn from
    train_list_fingerprint: str = ""  # sha256 of its class → image lists, as training drew them
    excluded_images: int = 0  # images left out for holding novel-class pixels (exclude_novel_…)
    stages: list[dict] = field(default_factory=list)  # [{name, steps, params}] when declared


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


def _autocast(device: str, precision: str):
    """bf16 autocast where asked (CUDA or CPU); fp32 otherwise."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def _save_resume(path: Path, state: dict) -> None:
    """Atomically: a kill mid-write leaves the previous checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


RESUME_KEYS = (
    "step",
    "model",
    "optimizer",
    "scheduler",
    "torch_rng",
    "curve",
    "validation",
    "best_step",
    "best",
    "best_state",
    "running",
    "seconds",
)


def _load_resume(path: Path) -> dict | None:
    """The resume state at `path`, loaded as tensors only (a resume file is data: a planted
    pickle is refused, never run). A torn, empty, foreign or incomplete file is named, moved
    aside to `<name>.bad` and the training starts from step 1: only time is lost."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return state
    except Exception as error:  # noqa: BLE001 - any unreadable file is discarded the same way
        _move_aside(path, "not a usable resume file", error)
        return None


def _move_aside(path: Path, what: str, error: Exception) -> None:
    """Name a resume file that cannot be used and why, move it to `<name>.bad`: the training
    starts from step 1 (only time is lost) and a rerun never trips on it again."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0][:160] if lines else 'empty'}"
    aside = path.with_name(path.name + ".bad")
    os.replace(path, aside)
    print(
        f"fsbench: {path}: {what} ({reason}); moved to {aside.name}, training this cell from "
        "step 1",
        file=sys.stderr,
        flush=True,
    )


def _fits(state: dict, path: Path, model, optimizer, scheduler) -> bool:
    """Put a resume state into the model, optimizer and schedule; a well-formed file of another
    model (or with an empty optimizer state) is named, moved aside and leaves all three as they
    were: every rerun would otherwise fail on it."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:  # None: the file ends a stage; the next one starts afresh
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        return True
    except Exception as error:  # noqa: BLE001 - torch raises several types for a misfit
        model.load_state_dict(before)
        _move_aside(path, "a resume file of another model or training", error)
        return False


def _check_filter_leaves_enough(full, filtered, split, fold, protocol, shot, cfg) -> None:
    """Every training class keeps enough images once `exclude_novel_images` removed those with a
    novel-class pixel: a class it empties would be skipped silently, and one it thins would fail
    deep in the sampler without saying that the filter did it."""
    need = shot + cfg.queries_per_way
    for class_id in full.train_classes(fold):
        before = len(full.class_images(split, class_id, protocol.min_object_pixels))
        after = len(filtered.class_images(split, class_id, protocol.min_object_pixels))
        if after < need <= before:  # the filter, not the data set, leaves too few
            raise FsbenchError(
                f"train class {class_id} has {after} image(s) left in {full.name}/{split} once "
                f"exclude_novel_images removed {before - after} of its {before} (each holds a "
                f"novel-class pixel); a {shot}-shot training episode needs {need}: drop "
                "train.exclude_novel_images or lower the shot"
            )


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
    on_curve=None,
    workers: int = 0,
    resume_path=None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train `model` on episodes of the fold's training classes; returns the selected weights.

    The training runs `cfg`'s stages in order (one stage without them): each stage trains its
    parameter groups only, under its own optimizer and schedule (rebuilt at its start), on its
    own steps, episodes or image batches; `model.stage` is the stage's name before its first
    step. `workers` DataLoader processes decode ahead of the step (0: in this loop). With
    `resume_path`, the state (weights, optimizer, scheduler, RNG, curve) is saved there every
    `checkpoint_every` steps, and a training that finds it resumes from it, mid-stage too: the
    result equals an uninterrupted run's, bit for bit."""
    if not model.trainable:
        raise FsbenchError(f"{type(model).__name__} does not train")
    started = time.perf_counter()
    split = dataset.train_split(protocol)
    excluded = set()
    if cfg.exclude_novel_images:  # BAM: no novel-class pixel is ever seen, even as background
        excluded = novel_images(dataset, split, fold) & training_images(
            dataset, split, fold, protocol.min_object_pixels
        )
        _check_filter_leaves_enough(
            dataset, WithoutNovelImages(dataset, excluded), split, fold, protocol, shot, cfg
        )
        dataset = WithoutNovelImages(dataset, excluded)
    if cfg.fold == "all":  # every class of the training data, none held out (cross-domain)
        classes = sorted({c for f in range(dataset.num_folds) for c in dataset.fold_classes(f)})
    else:
        classes = dataset.train_classes(fold)
    train_classes, val_classes = split_validation_classes(classes, cfg, fold)
    stages = Stages(model, cfg)
    model.to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    result = TrainResult(
        state_dict={},
        train_classes=train_classes,
        val_classes=val_classes,
        train_list=split,
        train_list_fingerprint=dataset.fingerprint(split, protocol.min_object_pixels),
        excluded_images=len(excluded),
        stages=stages.summary(),
    )
    best = -np.inf
    running: dict[str, float] = {}
    first, spent = 1, 0.0
    resume_path = Path(resume_path) if resume_path else None
    state = _load_resume(resume_path) if resume_path is not None else None
    resumed = None  # (optimizer, scheduler) of the stage a resume file left off in
    if state is not None:
        saved = stages.index_of(state["step"])  # the stage whose optimizer the file holds
        if saved is not None and stages.index_of(state["step"] + 1) == saved:  # mid-stage
            resumed = stages.optimizer(saved)
        if not _fits(state, resume_path, model, *(resumed or (None, None))):
            state, resumed = None, None
    if state is not None:
        torch.set_rng_state(state["torch_rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        result.curve, result.validation = state["curve"], state["validation"]
        result.curve_times = state.get("curve_times", [])
        result.best_step, best, running = state["best_step"], state["best"], state["running"]
        result.state_dict = state["best_state"]
        result.resumed_from = state["step"]
        first, spent = state["step"] + 1, state["seconds"]
    base_classes = sorted(train_classes) if model.base_class_labels else None
    for index, (name, stage_first, stage_last, scfg) in enumerate(stages.spans()):
        if stage_last < first:
            continue  # finished before the resume point
        model.stage = name
        stages.enter(index)
        train_mode(model, scfg)
        if resumed is not None and stage_first <= first - 1 < stage_last:
            optimizer, scheduler = resumed  # mid-stage: the state the resume file held
            stages.enter(index)
        else:
            optimizer, scheduler = stages.optimizer(index)
        resumed = None
        loader = EpisodeLoader(
            dataset,
            scfg.input_size or input_size,
            resize=protocol.resize,
            base_classes=base_classes,
        )
        plan = stage_plan(
            dataset, protocol, split, fold, train_classes, way, shot, scfg,
            stages.seed_material(index),
        )  # fmt: skip
        local_first = max(first, stage_first) - stage_first + 1
        stream = torch.utils.data.DataLoader(
            EpisodeStream(loader, plan[local_first - 1 :], AUGMENTATIONS.build(scfg.augmentation)),
            batch_size=None,
            num_workers=workers,
            pin_memory=cuda,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # DataLoader draws its workers' base seed from a generator: a private one keeps the
            # global torch RNG (dropout) the same whatever the worker count.
            generator=torch.Generator().manual_seed(0),
        )
        last_stage = index == len(stages) - 1
        for local, batch in enumerate(stream, start=local_first):
            step = stage_first + local - 1
            optimizer.zero_grad(set_to_none=True)
            losses = step_losses(model, _to(batch, device, cuda), _autocast(device, scfg.precision))
            optimizer.step()
            scheduler.step()
            for term, value in losses.items():
                running[term] = running.get(term, 0.0) + value
            if local % scfg.log_every == 0 or step == stage_last:
                count = scfg.log_every if local % scfg.log_every == 0 else local % scfg.log_every
                point = {"step": step, "lr": scheduler.get_last_lr()[0]}
                if stages.declared:
                    point["stage"] = index
                result.curve.append({**point, **{k: v / count for k, v in running.items()}})
                result.curve_times.append(int(time.time() * 1000))
                running = {}
                if on_curve is not None:  # live progress (the driver logs it to MLflow)
                    on_curve({**result.curve[-1], "time": result.curve_times[-1]})
            # checkpoint selection on held-out classes happens within the last stage only
            if last_stage and val_classes and (local % scfg.val_every == 0 or step == stage_last):
                score = validate(
                    model, loader, dataset, protocol, val_classes, way, shot, scfg, device
                )
                result.validation.append({"step": step, "miou": score})
                if score > best:
                    best, result.best_step = score, step
                    result.state_dict = copy.deepcopy(model.state_dict())
                train_mode(model, scfg)
            if resume_path is not None and checkpoint_every and step % checkpoint_every == 0:
                _save_resume(
                    resume_path,
                    {
                        "step": step,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
                        "curve": result.curve,
                        "curve_times": result.curve_times,
                        "validation": result.validation,
                        "best_step": result.best_step,
                        "best": best,
                        "best_state": result.state_dict,
                        "running": running,
                        "seconds": spent + time.perf_counter() - started,
                    },
                )
            if progress is not None:
                progress(step, stages.total)
    stages.leave()
    if not val_classes:
        result.best_step = stages.total
        result.state_dict = model.state_dict()
    result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    result.seconds = spent + time.perf_counter() - started
    return result


def _to(batch, device, cuda: bool):
    """A step's input on the device: its episodes, or its image batch."""
    if isinstance(batch, ImageBatch):
        return batch.to(device, non_blocking=cuda)
    return [episode.to(device, non_blocking=cuda) for episode in batch]


@torch.no_grad()
def validate(model, loader, dataset, protocol, val_classes, way, shot, cfg, device) -> float:
    """mIoU on a fixed episode list of the held-out training classes."""

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
        prediction = labels_of(model(episode), model.output_kind)
        for query in range(prediction.shape[0]):
            meter.update(prediction[query], episode.query_labels[query], spec.classes, index)
    return meter.miou()
