"""One optimisation step as a recipe says: the optimizer over the method's parameter groups
(`lr_mult`), the learning-rate schedule (step, constant, poly), the BatchNorm mode of each group,
and a step over several episodes — a true batch where BatchNorm trains, exact gradient
accumulation otherwise."""

from __future__ import annotations

import torch
from torch import nn

from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import ImageBatch


def parameter_groups(model) -> dict[str, list]:
    """The method's named parameter groups (`param_groups()`; the base class: one, "all")."""
    return model.param_groups() or {"all": list(model.parameters())}


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, one group per named group of the
    method at lr × its `lr_mult` factor."""
    named = parameter_groups(model)
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
    if cfg.optimizer == "adamw":  # HDMNet's: decoupled weight decay, betas (0.9, 0.999)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def make_scheduler(optimizer, cfg: TrainConfig):
    """step: ×lr_gamma at each milestone; constant; poly: step s (1-based) runs at
    lr·(1 − s/steps)^poly_power, as PFENet's poly_learning_rate before each iteration."""
    if cfg.lr_schedule == "poly":
        steps, power = cfg.steps, cfg.poly_power
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: max(0.0, 1 - (done + 1) / steps) ** power
        )
    milestones = list(cfg.lr_milestones) if cfg.lr_schedule == "step" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.lr_gamma)


def _batchnorms(modules) -> list[nn.Module]:
    return [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode(model, cfg: TrainConfig) -> None:
    """`model.train()`, then each `batchnorm` group's BatchNorm layers in its mode (a layer
    belongs to the group holding its affine parameters; "all" names every layer)."""
    model.train()
    if not cfg.batchnorm:
        return
    named = parameter_groups(model)
    unknown = sorted(set(dict(cfg.batchnorm)) - set(named) - {"all"})
    if unknown:
        raise FsbenchError(
            f"train.batchnorm: {type(model).__name__} has no parameter group {unknown}; its "
            f"groups: {sorted(named)} (or all)"
        )
    for group, mode in cfg.batchnorm:
        if group == "all":
            layers = _batchnorms(model.modules())
        else:
            members = {id(p) for p in named[group]}
            layers = [m for m in _batchnorms(model.modules()) if id(m.weight) in members]
        for layer in layers:
            layer.train(mode == "train")


def trains_batchnorm(model) -> bool:
    """Whether any BatchNorm layer updates its statistics (batches then differ from sums)."""
    return any(m.training and m.track_running_stats for m in _batchnorms(model.modules()))


def step_losses(model, episodes, autocast) -> dict[str, float]:
    """Gradients of one step over `episodes` (their losses' mean); returns each term's value.

    An `ImageBatch` (a `sampler: images` step) goes through the method's `loss_images`.

    One episode: its loss. Several: the method's `loss_batch` (a true batch) when it has one;
    else each episode's loss / n, backpropagated one at a time (the same gradient as the mean,
    at one episode's memory) — refused when BatchNorm trains, whose statistics would then be
    per episode instead of per batch."""
    if isinstance(episodes, ImageBatch):
        with autocast:
            losses = model.loss_images(episodes)
        losses["total"].backward()
        return {name: float(value.detach()) for name, value in losses.items()}
    if len(episodes) == 1 or model.batched_loss:
        with autocast:
            losses = model.loss(episodes[0]) if len(episodes) == 1 else model.loss_batch(episodes)
        losses["total"].backward()
        return {name: float(value.detach()) for name, value in losses.items()}
    if trains_batchnorm(model):
        raise FsbenchError(
            f"train.episodes_per_step={len(episodes)}: {type(model).__name__} trains BatchNorm "
            "layers but has no batched loss (loss_batch); set their mode to eval "
            "(train.batchnorm) or use one episode per step"
        )
    totals: dict[str, float] = {}
    for episode in episodes:
        with autocast:
            losses = model.loss(episode)
        (losses["total"] / len(episodes)).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) / len(episodes)
    return totals
