"""Episodic training (PANet's recipe as config values, not constants), deterministic per seed."""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsbench.benchmarks.metrics import SegmentationMeter
from fsbench.core import FsbenchError, atomic_write_bytes, seeded_rng
from fsbench.datasets.episodes import EpisodeLoader, sample_episode

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("step", "constant")
# Settings added after results existed, left out of a cell's identity while at their default.
LATER_DEFAULTS = {
    "precision": "fp32",
    "optimizer": "sgd",
    "lr_schedule": "step",
    "lr_mult": (),
    "nesterov": False,
    "input_size": 0,
}


def _is_kind(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list)) and all(_is_kind(v, int) for v in value)
    if kind == "lr_mult":
        return isinstance(value, tuple) and all(
            isinstance(k, str) and _is_kind(v, float) for k, v in value
        )
    return isinstance(value, str)


# Annotation strings (from __future__ annotations) → the kind of value a field accepts.
_FIELD_KINDS = {
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[int, ...]": tuple,
    "tuple[tuple[str, float], ...]": "lr_mult",
}


@dataclass(frozen=True)
class TrainConfig:
    """PANet's defaults: SGD 1e-3, momentum 0.9, wd 5e-4, ×0.1 at 10k/20k, 30k steps, flips.
    Other recipes: `optimizer` sgd | adam, `lr_schedule` step | constant, `lr_mult` {group:
    factor} over the parameter groups the method names (`param_groups`), `nesterov`."""

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
    precision: str = "fp32"  # or "bf16": autocast of the forward and loss (CUDA, or CPU)
    optimizer: str = "sgd"  # or "adam" (momentum unused; weight_decay as Adam's L2 term)
    lr_schedule: str = "step"  # "step": ×lr_gamma at lr_milestones; "constant"
    lr_mult: tuple[tuple[str, float], ...] = ()  # (group, factor): the method's param groups
    nesterov: bool = False
    input_size: int = 0  # training input side (CANet's recipe: 321); 0: the cell's input_size

    def __post_init__(self):
        problems = []
        for item in dataclasses.fields(self):
            value, kind = getattr(self, item.name), _FIELD_KINDS.get(item.type, str)
            if not _is_kind(value, kind):
                wanted = {int: "an integer", float: "a number", bool: "true or false"}
                raise FsbenchError(
                    f"train.{item.name}: {value!r} is not {wanted.get(kind, 'a list of integers')}"
                    + (" (write 1e-3 as 0.001 or 1.0e-3)" if isinstance(value, str) else "")
                )
        if self.steps < 1:
            problems.append(f"steps={self.steps} (must be ≥ 1)")
        if self.input_size and not 16 <= self.input_size <= 4096:
            problems.append(f"input_size={self.input_size} (16…4096, or 0: the cell's)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if any(m <= 0 for m in self.lr_milestones):
            problems.append(f"lr_milestones={list(self.lr_milestones)} (must be > 0)")
        if self.val_classes < 0 or self.val_every < 1 or self.val_episodes < 1:
            problems.append("val_classes ≥ 0, val_every ≥ 1 and val_episodes ≥ 1 are required")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} (one of {', '.join(PRECISIONS)})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} (one of {', '.join(OPTIMIZERS)})")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule={self.lr_schedule!r} (one of {', '.join(LR_SCHEDULES)})")
        if any(v <= 0 for _, v in self.lr_mult):
            problems.append(f"lr_mult={dict(self.lr_mult)} (factors must be > 0)")
        if problems:
            raise FsbenchError("impossible training setting: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """The inverse of `to_dict` (lists back to tuples, lr_mult back to pairs)."""
        raw = dict(raw)
        raw["lr_milestones"] = tuple(raw.get("lr_milestones", ()))
        if "lr_mult" in raw:
            raw["lr_mult"] = tuple(sorted(dict(raw["lr_mult"]).items()))
        return cls(**raw)

    def to_dict(self) -> dict:
        """Every setting, except new ones at their default: a cell's id (a hash of this) then
        stays the same when a setting is added, and finished results stay valid."""
        out = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
        }
        if "lr_mult" in out:
            out["lr_mult"] = dict(self.lr_mult)
        return out


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


class _EpisodeStream(torch.utils.data.Dataset):
    """Step i's episode, decoded and augmented (in a DataLoader worker when there are any).

    Its content depends only on i: the episode ids and flips are drawn up front, in the main
    process, from the seeded generators, so any worker count gives the same batches."""

    def __init__(self, loader: EpisodeLoader, plan: list):
        self.loader, self.plan = loader, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int):
        spec, flips = self.plan[index]
        return self.loader.load(spec, flips)


def episode_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg) -> list:
    """[(EpisodeSpec, flips)] of every training step, from the seeded generators, in order."""
    rng = seeded_rng("train-episodes", cfg.seed, dataset.name, fold, way, shot)
    flip_rng = seeded_rng("train-flips", cfg.seed) if cfg.flip else None
    plan = []
    for _ in range(cfg.steps):
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
        flips = tuple(bool(flip_rng.random() < 0.5) for _ in range(images)) if flip_rng else None
        plan.append((spec, flips))
    return plan


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, one group per named group of the
    method (`param_groups()`, default: one group "all") at lr × its `lr_mult` factor."""
    named = model.param_groups() if hasattr(model, "param_groups") else None
    named = named or {"all": list(model.parameters())}
    factors = dict(cfg.lr_mult)
    unknown = sorted(set(factors) - set(named))
    if unknown:
        raise FsbenchError(
            f"train.lr_mult: {type(model).__name__} has no parameter group {unknown}; its "
            f"groups: {sorted(named)}"
        )
    groups = [
        {"params": [p for p in params if p.requires_grad], "lr": cfg.lr * factors.get(name, 1.0)}
        for name, params in named.items()
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def _autocast(device: str, precision: str):
    """bf16 autocast where asked (CUDA or CPU); fp32 otherwise."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def _save_resume(path: Path, state: dict) -> None:
    """Atomically: a kill mid-write leaves the previous checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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

    `workers` DataLoader processes decode episodes ahead of the step (0: in this loop). With
    `resume_path`, the state (weights, optimizer, scheduler, RNG, curve) is saved there every
    `checkpoint_every` steps, and a training that finds it resumes from it: the result equals an
    uninterrupted run's, bit for bit."""
    if not model.trainable:
        raise FsbenchError(f"{type(model).__name__} does not train")
    started = time.perf_counter()
    split = dataset.train_split(protocol)
    train_classes, val_classes = split_validation_classes(dataset.train_classes(fold), cfg, fold)
    loader = EpisodeLoader(dataset, cfg.input_size or input_size, resize=protocol.resize)
    plan = episode_plan(dataset, protocol, split, fold, train_classes, way, shot, cfg)
    model.to(device).train()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, cfg)
    milestones = list(cfg.lr_milestones) if cfg.lr_schedule == "step" else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.lr_gamma)
    result = TrainResult(
        state_dict={}, train_classes=train_classes, val_classes=val_classes, train_list=split
    )
    best = -np.inf
    running: dict[str, float] = {}
    first, spent = 1, 0.0
    resume_path = Path(resume_path) if resume_path else None
    if resume_path is not None and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        result.curve, result.validation = state["curve"], state["validation"]
        result.curve_times = state.get("curve_times", [])
        result.best_step, best, running = state["best_step"], state["best"], state["running"]
        result.state_dict = state["best_state"]
        result.resumed_from = state["step"]
        first, spent = state["step"] + 1, state["seconds"]
    stream = torch.utils.data.DataLoader(
        _EpisodeStream(loader, plan[first - 1 :]),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # DataLoader draws its workers' base seed from a generator: a private one keeps the
        # global torch RNG (dropout) the same whatever the worker count.
        generator=torch.Generator().manual_seed(0),
    )
    for step, episode in enumerate(stream, start=first):
        episode = episode.to(device, non_blocking=cuda)
        with _autocast(device, cfg.precision):
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
            result.curve_times.append(int(time.time() * 1000))
            running = {}
            if on_curve is not None:  # live progress (the driver logs it to MLflow)
                on_curve({**result.curve[-1], "time": result.curve_times[-1]})
        if val_classes and (step % cfg.val_every == 0 or step == cfg.steps):
            score = validate(model, loader, dataset, protocol, val_classes, way, shot, cfg, device)
            result.validation.append({"step": step, "miou": score})
            if score > best:
                best, result.best_step = score, step
                result.state_dict = copy.deepcopy(model.state_dict())
            model.train()
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
            progress(step, cfg.steps)
    if not val_classes:
        result.best_step = cfg.steps
        result.state_dict = model.state_dict()
    result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    result.seconds = spent + time.perf_counter() - started
    return result


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
        prediction = model(episode).argmax(1)
        for query in range(prediction.shape[0]):
            meter.update(prediction[query], episode.query_labels[query], spec.classes, index)
    return meter.miou()
