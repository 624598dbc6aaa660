"""Training recipes as grid values: `TrainConfig` (optimizer, schedule, steps, augmentation,
episodes per step, BatchNorm mode, …), checked with one-line errors. A plain frozen dataclass:
parsing a grid never imports the trainer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fsbench.benchmarks.grid.lineage_recipes import RECIPES  # noqa: F401 (re-exported)
from fsbench.core import FsbenchError
from fsbench.datasets.augment import AUGMENTATIONS

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("step", "constant", "poly")
BATCHNORM_MODES = ("train", "eval")
# What a training step draws: fsbench's episodes (a class uniformly, then images), the training
# protocol's lineage's episodes (`official`: PFENet — an image, then one of its classes; HSNet —
# every listed (image, class) pair once per epoch; PANet's is fsbench's), or batches of training
# images with their base-class labels (a base learner's stage; each image once per epoch).
TRAIN_SAMPLERS = ("fsbench", "official", "images")
# Settings written as {key: value} in a grid, held as sorted (key, value) pairs.
MAPPINGS = ("lr_mult", "batchnorm", "dataset")


def original(default):
    """A setting of the first cell records: always part of a cell's identity."""
    return field(default=default, metadata={"identity": "always"})


def later(default):
    """A setting added after results existed: part of a cell's identity only away from its
    default, so finished cells keep their ids. Every new setting is declared this way."""
    return field(default=default, metadata={"identity": "when_set"})


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
    if kind == "stages":
        return isinstance(value, tuple) and all(isinstance(v, tuple) for v in value)
    if kind == "dataset":
        return isinstance(value, tuple) and all(isinstance(k, str) for k, _ in value)
    if kind == "batchnorm":
        return isinstance(value, tuple) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value
        )
    return isinstance(value, str)


# Annotation strings (from __future__ annotations) → the kind of value a field accepts.
_FIELD_KINDS = {
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[int, ...]": tuple,
    "tuple[tuple[str, float], ...]": "lr_mult",
    "tuple[tuple[str, str], ...]": "batchnorm",
    "tuple": "stages",
    "tuple[tuple[str, object], ...]": "dataset",
}


@dataclass(frozen=True)
class TrainConfig:
    """PANet's defaults: SGD 1e-3, momentum 0.9, wd 5e-4, ×0.1 at 10k/20k, 30k steps, flips.
    Other recipes: `optimizer` sgd | adam, `lr_schedule` step | constant | poly (`poly_power`),
    `lr_mult` {group: factor} over the parameter groups the method names (`param_groups`),
    `nesterov`, `episodes_per_step`, `batchnorm` {group: train | eval}, `augment` (a name in
    fsbench.datasets.augment.AUGMENTATIONS; `flip: true` is `augment: flip`)."""

    steps: int = original(30000)
    lr: float = original(1e-3)
    momentum: float = original(0.9)
    weight_decay: float = original(5e-4)
    lr_milestones: tuple[int, ...] = original((10000, 20000))
    lr_gamma: float = original(0.1)
    flip: bool = original(True)
    seed: int = original(0)
    queries_per_way: int = original(1)
    # Checkpoint selection on classes held out of the training classes (never the test classes).
    val_classes: int = original(0)
    val_every: int = original(1000)
    val_episodes: int = original(100)
    log_every: int = original(10)
    precision: str = later("fp32")  # or "bf16": autocast of the forward and loss (CUDA, or CPU)
    # or "adam" (momentum unused; weight_decay as Adam's L2 term), or "adamw" (decoupled decay)
    optimizer: str = later("sgd")
    # "step": ×lr_gamma at lr_milestones; "constant"; "poly": lr·(1 − step/steps)^poly_power
    lr_schedule: str = later("step")
    lr_mult: tuple[tuple[str, float], ...] = later(())  # (group, factor): the method's groups
    nesterov: bool = later(False)
    input_size: int = later(0)  # training input side (CANet's recipe: 321); 0: the cell's
    poly_power: float = later(0.9)  # PFENet's power
    # Episodes per optimisation step: a true batch for methods whose BatchNorm trains (their
    # `loss_batch`), else exact gradient accumulation, one episode at a time.
    episodes_per_step: int = later(1)
    # (group, "train" | "eval"): the mode of the BatchNorm layers of a parameter group while
    # training (default: as model.train() leaves them, i.e. what the method itself sets)
    batchnorm: tuple[tuple[str, str], ...] = later(())
    augment: str = later("")  # "": `flip` decides (flip | none); or e.g. "pfenet"
    # BAM's filter: leave out training images holding any pixel of the fold's test classes
    exclude_novel_images: bool = later(False)
    sampler: str = later("fsbench")  # TRAIN_SAMPLERS: what one step draws
    images_per_step: int = later(8)  # the batch of a `sampler: images` step
    # Training stages, run in order (each a tuple of sorted (key, value) pairs: `name`,
    # `params` — the parameter groups it trains — and any setting above, over this config's).
    stages: tuple = later(())
    # Cross-domain training: the training data when it is not the test data (a dataset
    # mapping, as the grid's `dataset:`; PATNet trains on PASCAL and tests on Deepglobe, …),
    # and `fold: all` — every class of it, none held out (PATNet's --fold 4); "": the cell's.
    dataset: tuple[tuple[str, object], ...] = later(())
    fold: str = later("")
    # The augmentation's own `version` (set from the registry, never written): a changed
    # augmentation moves the ids of the cells it trains.
    augment_version: str = later("")

    def __post_init__(self):
        problems = []
        for item in dataclasses.fields(self):
            if item.metadata.get("identity") not in ("always", "when_set"):
                raise FsbenchError(
                    f"TrainConfig.{item.name}: declare it with original(…) or later(…) (how it "
                    "joins a cell's id); a new setting is later(default)"
                )
            value, kind = getattr(self, item.name), _FIELD_KINDS.get(item.type, str)
            if isinstance(value, float) and not math.isfinite(value):
                raise FsbenchError(f"train.{item.name}: {value!r} is not a finite number")
            if not _is_kind(value, kind):
                wanted = {int: "an integer", float: "a number", bool: "true or false"}
                raise FsbenchError(
                    f"train.{item.name}: {value!r} is not {wanted.get(kind, 'a list of integers')}"
                    + (
                        " (write 1e-3 as 0.001 or 1.0e-3)"
                        if isinstance(value, str) and kind in (int, float)
                        else ""
                    )
                )
        # `augment: flip` / `none` are `flip: true` / `false`: one spelling, one cell id.
        if self.augment in ("flip", "none"):
            object.__setattr__(self, "flip", self.augment == "flip")
            object.__setattr__(self, "augment", "")
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
        if self.poly_power <= 0:
            problems.append(f"poly_power={self.poly_power} (must be > 0)")
        if not 1 <= self.episodes_per_step <= 1024:
            problems.append(f"episodes_per_step={self.episodes_per_step} (1…1024)")
        if any(mode not in BATCHNORM_MODES for _, mode in self.batchnorm):
            problems.append(
                f"batchnorm={dict(self.batchnorm)} (modes: {', '.join(BATCHNORM_MODES)})"
            )
        if self.sampler not in TRAIN_SAMPLERS:
            problems.append(f"sampler={self.sampler!r} (one of {', '.join(TRAIN_SAMPLERS)})")
        if not 1 <= self.images_per_step <= 4096:
            problems.append(f"images_per_step={self.images_per_step} (1…4096)")
        if self.augment and self.augment not in AUGMENTATIONS:
            problems.append(
                f"augment={self.augment!r} (one of {', '.join(AUGMENTATIONS.list())}, or a "
                "plugin's AUGMENTATIONS.register)"
            )
        if self.fold not in ("", "all"):
            problems.append(f"fold={self.fold!r} (all: every class of the training data)")
        if self.dataset and "name" not in dict(self.dataset):
            problems.append(f"dataset={dict(self.dataset)} (a dataset mapping with a name)")
        if problems:
            raise FsbenchError("impossible training setting: " + "; ".join(problems))
        if self.augmentation in AUGMENTATIONS:
            version = AUGMENTATIONS.get(self.augmentation).version
            object.__setattr__(self, "augment_version", version)
        if self.stages:
            self.stage_configs()  # each stage's settings checked as a whole TrainConfig

    @property
    def total_steps(self) -> int:
        """Steps of the whole training: the stages' sum, or `steps`."""
        return sum(c.steps for _, _, c in self.stage_configs()) if self.stages else self.steps

    def stage_configs(self) -> list[tuple[str, tuple[str, ...], TrainConfig]]:
        """[(name, parameter groups it trains, its settings)] in order; one stage ("train",
        ("all",), this config) when no stages are declared."""
        if not self.stages:
            return [("train", ("all",), self)]
        base = dataclasses.replace(self, stages=())
        out = []
        for stage in self.stages:
            values = dict(stage)
            name, params = values.pop("name"), values.pop("params", ("all",))
            out.append((name, tuple(params), dataclasses.replace(base, **values)))
        return out

    @property
    def training_data(self) -> dict | None:
        """The training dataset mapping of a cross-domain training, else None (the cell's)."""
        return dict(self.dataset) if self.dataset else None

    @property
    def augmentation(self) -> str:
        """The augmentation recipe's name (`flip` and `none` come from `flip`)."""
        return self.augment or ("flip" if self.flip else "none")

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """The inverse of `to_dict` (lists back to tuples, mappings back to sorted pairs)."""
        raw = dict(raw)
        raw["lr_milestones"] = tuple(raw.get("lr_milestones", ()))
        for key in MAPPINGS:
            if key in raw:
                raw[key] = tuple(sorted(dict(raw[key]).items()))
        if "stages" in raw:
            raw["stages"] = normalise_stages(raw["stages"], "train.stages")
        return cls(**raw)

    def to_dict(self) -> dict:
        """Every setting, except later ones at their default: a cell's id (a hash of this) then
        stays the same when a setting is added, and finished results stay valid."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.metadata["identity"] == "when_set" and value == item.default:
                continue
            out[item.name] = list(value) if isinstance(value, tuple) else value
        for key in MAPPINGS:
            if key in out:
                out[key] = dict(getattr(self, key))
        if "stages" in out:
            out["stages"] = [_stage_json(stage) for stage in self.stages]
        return out


# A stage may set every training key but these (one seed and one list of stages per training).
NOT_PER_STAGE = ("stages", "seed", "dataset", "fold")


def normalise_stages(raw, where: str) -> tuple:
    """`stages:` as written (a list of mappings) → a tuple of sorted (key, value) tuples, each
    value hashable (lists → tuples, mappings → sorted pairs); names unique, keys known."""
    if isinstance(raw, tuple):  # normalised already, or a method's default_stages()
        raw = [_stage_json(stage) if isinstance(stage, tuple) else stage for stage in raw]
    if not isinstance(raw, list) or not raw:
        raise FsbenchError(
            f"{where}: expected a list of stages, e.g. [{{name: base, steps: 4000, params: "
            "[base]}, {name: meta, steps: 30000, params: [meta]}]"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_PER_STAGE)
    stages, names = [], []
    for index, stage in enumerate(raw):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise FsbenchError(f"{where}[{index}]: a stage is a mapping with a `name:`")
        unknown = sorted(set(stage) - fields - {"name", "params"})
        if unknown:
            raise FsbenchError(
                f"{where}[{index}] ({stage['name']}): unknown key(s) {unknown}; a stage takes "
                f"name, params and the training keys {sorted(fields)}"
            )
        params = stage.get("params", ["all"])
        if isinstance(params, str):
            params = [params]
        if (
            not isinstance(params, (list, tuple))
            or not params
            or not all(isinstance(p, str) for p in params)
        ):
            raise FsbenchError(
                f"{where}[{index}] ({stage['name']}): params {params!r} is not a list of the "
                "method's parameter groups (param_groups()), e.g. [meta] or [all]"
            )
        names.append(stage["name"])
        items = []
        for key, value in stage.items():
            if key in MAPPINGS and isinstance(value, dict):
                value = tuple(sorted(value.items()))
            elif isinstance(value, list):
                value = tuple(value)
            items.append((key, value))
        items = [(k, v) for k, v in items if k != "params"] + [("params", tuple(params))]
        stages.append(tuple(sorted(items)))
    if len(set(names)) != len(names):
        raise FsbenchError(f"{where}: stage names {names} repeat; name each stage once")
    return tuple(stages)


def _stage_json(stage: tuple) -> dict:
    out = {}
    for key, value in stage:
        if key in MAPPINGS:
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def check_stages(stages, groups, where: str) -> None:
    """Stages (as written or normalised) whose `params` name only `groups` (the method's
    param_groups() and "all"); raises FsbenchError naming the misfit."""
    config = TrainConfig(stages=normalise_stages(stages, where))
    for name, params, _ in config.stage_configs():
        unknown = sorted(set(params) - set(groups))
        if unknown:
            raise FsbenchError(
                f"{where}: stage {name} trains parameter group(s) {unknown} the method does "
                f"not have; its groups: {sorted(groups)}"
            )
