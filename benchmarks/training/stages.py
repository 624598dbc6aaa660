"""A training's stages as the loop runs them (`train: {stages: [...]}` or a method's
`default_stages()`): each stage's span of global steps, the parameter groups it trains (the others
get no gradient: requires_grad off while it runs, restored after), and its optimizer and schedule,
rebuilt at its start. A training without stages is one stage, "train", over every parameter."""

from __future__ import annotations

from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.optim import make_optimizer, make_scheduler, parameter_groups
from fsbench.core import FsbenchError


class Stages:
    def __init__(self, model, cfg: TrainConfig):
        self.model = model
        self.declared = bool(cfg.stages)
        self.configs = cfg.stage_configs()
        self.groups = parameter_groups(model)
        self._original = {id(p): p.requires_grad for p in model.parameters()}
        known = set(self.groups) | {"all"}
        for name, params, _ in self.configs:
            unknown = sorted(set(params) - known)
            if unknown:
                raise FsbenchError(
                    f"train.stages: stage {name} trains parameter group(s) {unknown} that "
                    f"{type(model).__name__} does not have; its groups: {sorted(known)}"
                )

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def total(self) -> int:
        return sum(c.steps for _, _, c in self.configs)

    def spans(self):
        """(name, first global step, last global step, settings) of each stage, in order."""
        first = 1
        for name, _, cfg in self.configs:
            yield name, first, first + cfg.steps - 1, cfg
            first += cfg.steps

    def index_of(self, step: int) -> int | None:
        """The stage that runs global step `step` (None: past the last)."""
        for index, (_, first, last, _) in enumerate(self.spans()):
            if first <= step <= last:
                return index
        return None

    def enter(self, index: int) -> None:
        """Only the stage's parameter groups train (within what the method itself trains)."""
        params = self.configs[index][1]
        chosen = None if "all" in params else {id(p) for g in params for p in self.groups[g]}
        for parameter in self.model.parameters():
            original = self._original.get(id(parameter), parameter.requires_grad)
            parameter.requires_grad_(original and (chosen is None or id(parameter) in chosen))
        if not any(p.requires_grad for p in self.model.parameters()):
            raise FsbenchError(
                f"train.stages: stage {self.configs[index][0]} trains no parameter (its groups "
                f"{list(params)} are frozen by the method); name groups that train"
            )

    def leave(self) -> None:
        """Every parameter's requires_grad as the method set it."""
        for parameter in self.model.parameters():
            parameter.requires_grad_(self._original.get(id(parameter), parameter.requires_grad))

    def optimizer(self, index: int):
        """A fresh (optimizer, scheduler) for the stage, over the parameters it trains."""
        self.enter(index)
        cfg = self.configs[index][2]
        optimizer = make_optimizer(self.model, cfg)
        return optimizer, make_scheduler(optimizer, cfg)

    def seed_material(self, index: int) -> tuple:
        """What joins the seeds of a stage's episodes and augmentations: nothing for a training
        without stages (its plan is the one it always drew), else the stage's index and name."""
        return (index, self.configs[index][0]) if self.declared else ()

    def summary(self) -> list[dict]:
        """[{name, steps, params, sampler}] of declared stages, as the cell record names them."""
        if not self.declared:
            return []
        return [
            {"name": name, "steps": cfg.steps, "params": list(params), "sampler": cfg.sampler}
            for name, params, cfg in self.configs
        ]
