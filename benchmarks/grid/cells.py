"""A grid as values: `GridSpec` (a parsed grid file) expands into `Cell`s (method variant ×
dataset × fold × way × shot × annotation × training seed), each with its protocol resolved for
its dataset and a stable content-hash id. Pure and deterministic; grid.py reads the files."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
from dataclasses import dataclass, field

import torch

from fsbench.benchmarks.grid.entries import MethodSpec
from fsbench.benchmarks.grid.identity import CellConfig
from fsbench.benchmarks.grid.names import cell_title
from fsbench.benchmarks.grid.recipes import TrainConfig, normalise_stages
from fsbench.core import FsbenchError, canonical_sha256
from fsbench.datasets.protocols import Protocol, check_sampler, resolve
from fsbench.datasets.registry import dataset_class
from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod


def method_version(name: str) -> str:
    """The `version` the method's class declares ("" when none, or when its builder does not
    say which class it builds)."""
    declared = METHODS.provides(name)
    if declared is None or not issubclass(declared, FewShotMethod):
        return ""
    return declared.version or ""


@dataclass(frozen=True)
class Cell:
    """One (method variant, dataset, fold, way, shot, annotation, protocol): trained once,
    evaluated on one manifest per seed."""

    grid: str
    method: MethodSpec
    dataset: dict
    fold: int
    way: int
    shot: int
    annotation: str
    protocol: str
    input_size: int
    episodes: int
    seeds: tuple[int, ...]
    train: TrainConfig | None  # None for methods that do not train
    eval_precision: str = "fp32"
    evaluators: tuple[str, ...] = ()  # the grid's named evaluators, fed on every path
    train_replicate: bool = False  # one of several training seeds of the same row (train_seeds)
    sampler: str = "fsbench"  # who draws the test episodes: "official" replay or fsbench's
    # The protocol the cell is scored under, when not `protocol` (the one its model trains under).
    eval_protocol: str = ""
    # The protocol it is scored under, resolved for the cell's dataset, once.
    preset: Protocol | None = field(default=None, compare=False)
    # The same model's cell under its training protocol (eval_protocol cells): its model.
    trained_as: Cell | None = field(default=None, compare=False, repr=False)
    # The cell whose trained model this cell's training starts from (`init_from:`).
    upstream: Cell | None = field(default=None, compare=False, repr=False)
    train_shot: int = 0  # scored with the model trained at this shot (0: its own)
    # Scored at this label resolution instead of its protocol's (`sensitivity: true` copies).
    score_resolution: str = ""

    def settings(self) -> CellConfig:
        """The resolved config, typed: everything that decides the result (and nothing else)."""
        checkpoint = None
        if self.method.checkpoint:
            path, kind, digest = self.method.checkpoint
            checkpoint = {"path": path, "format": kind, "sha256": digest}
        return CellConfig(
            method=self.method.name,
            method_kwargs=dict(self.method.kwargs),
            row=self.method.row(),
            dataset=dict(self.dataset),
            fold=self.fold,
            way=self.way,
            shot=self.shot,
            annotation=self.annotation,
            protocol=self.protocol,
            input_size=self.input_size,
            episodes=self.episodes,
            seeds=tuple(self.seeds),
            train=self.train.to_dict() if self.train else None,
            eval_precision=self.eval_precision,
            evaluators=tuple(self.evaluators),
            sampler=self.sampler,
            checkpoint=checkpoint,
            eval_protocol=self.eval_protocol,
            method_version=method_version(self.method.name),
            init_from=self.upstream.model_key() if self.upstream is not None else "",
            train_shot=self.train_shot,
            score_resolution=self.score_resolution,
        )

    def config(self) -> dict:
        """`settings()` as the JSON a record stores and the id hashes."""
        return self.settings().to_json()

    @property
    def id(self) -> str:
        return canonical_sha256(self.settings().identity())[:16]

    @property
    def title(self) -> str:
        """`PANet w/o PAR · fold 0 · 1-shot`: the cell's name in the console, records and MLflow."""
        seed = self.train.seed if self.train and self.train_replicate else None
        return cell_title(
            self.settings(), self.method.display, seed, METHODS.display(self.method.name)
        )

    def model_cell(self) -> Cell:
        """The cell whose model scores this one, under its training protocol and shot."""
        return self.trained_as.model_cell() if self.trained_as is not None else self

    def model_key(self) -> str:
        """Cells with the same key share one model: a trained model serves every annotation
        (PANet trains on dense masks and tests with weak ones); an untrained one also every shot;
        any model every protocol it is scored under (that of the cell it is trained as)."""
        if self.trained_as is not None:
            return self.trained_as.model_key()
        per_shot = getattr(METHODS.provides(self.method.name), "model_per_shot", False)
        shared = ("seeds", "row", "annotation")
        if self.train is None and not per_shot:  # an untrained model serves every shot
            shared += ("shot",)
        if self.train is not None and all(
            c.sampler == "images" for _, _, c in self.train.stage_configs()
        ):  # trained on image batches alone: one model for every shot and way
            shared += ("shot", "way")
        if self.train is not None and self.train.dataset:
            # trained on other data (cross-domain): one model for every test set and its fold
            shared += ("dataset", "fold", "episodes", "sampler")
        identity = {k: v for k, v in self.config().items() if k not in shared}
        return canonical_sha256(identity)[:16]


@dataclass(frozen=True)
class GridSpec:
    name: str
    dataset: dict
    methods: tuple[MethodSpec, ...]
    # Several test sets (`dataset:` a list): every cell once per set, the same models (()):
    # `dataset` alone)
    test_datasets: tuple[dict, ...] = ()
    protocol: str = "panet"
    # Protocols each model is also scored under (trained once, under `protocol`); (): `protocol`.
    eval_protocols: tuple[str, ...] = ()
    sampler: str | None = None  # None: the protocol's ("official" for the named ones)
    input_size: int | None = None  # None: the protocol's
    episodes: int | None = None  # None: the protocol's
    seeds: tuple[int, ...] | None = None  # None: the protocol's
    folds: tuple[int, ...] = (0, 1, 2, 3)
    ways: tuple[int, ...] = (1,)
    shots: tuple[int, ...] = (1, 5)
    annotation: tuple[str, ...] = ("mask",)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    eval_batch_size: int = 16
    cache_bytes: int = 2 << 30
    spill_bytes: int | None = None  # disk for spilled encodings (None: half the free space)
    eval_precision: str = "fp32"
    evaluators: tuple[str, ...] = ()  # registered evaluators fed every batch (metrics.EVALUATORS)
    train_shot: int = 0  # every shot scored with the model trained at this shot (0: its own)
    # Also score each model at the other label resolution, for the report's sensitivity table.
    sensitivity: bool = False
    seed_summary: str = "mean"  # "best": tables add each fold's best test seed, marked as such
    train_workers: int = 1  # DataLoader processes decoding episodes ahead of the step
    train_gpus: int = 1  # whole GPUs a training task asks for on a GPU cluster
    eval_gpus: float | None = None  # an evaluation task's GPU share (None: the CLI's, 0.5)
    checkpoint_every: int = 1000  # training steps between resumable checkpoints (0: none)
    train_seeds: tuple[int, ...] | None = None  # one trained model per seed (None: train.seed)
    compare: tuple[tuple[str, str], ...] = ()  # (variant, base) rows: paired comparisons
    strict: bool = False  # only methods pretrained on nothing beyond ImageNet (`pretraining`)
    imports: tuple[str, ...] = ()  # modules registering the grid's own methods and datasets
    plugin_paths: tuple[str, ...] = ()  # where they are found besides sys.path (the grid's folder)

    def expand(self) -> list[Cell]:
        """Every cell of the grid, in a fixed order (test set, method, fold, way, shot,
        annotation, training seed, then the protocols it is scored under)."""
        if self.test_datasets:
            return [
                cell
                for dataset in self.test_datasets
                for cell in dataclasses.replace(self, dataset=dataset, test_datasets=()).expand()
            ]
        if self.strict:
            return dataclasses.replace(self, methods=_strict(self.methods), strict=False).expand()
        name = self.dataset["name"]
        folds = getattr(dataset_class(name), "num_folds", None)
        bad = [f for f in self.folds if folds is not None and f >= folds]
        if bad:
            raise FsbenchError(
                f"folds: {bad[0]} is impossible: {name} has folds 0…{folds - 1}; drop it"
            )
        protocol = resolve(self.protocol, name)
        sampler = check_sampler(self.sampler, protocol, name)
        trainable = {m.row(): _is_trainable(METHODS, m) and not m.checkpoint for m in self.methods}
        input_size = self.input_size or protocol.input_size
        for method in self.methods:
            _check_input_size(
                method, input_size, self.protocol, trainable[method.row()], self.train
            )
        scoring = self._scoring(name)
        cells, homes = [], []
        for method, fold, way, shot, annotation, train_seed in itertools.product(
            self.methods,
            self.folds,
            self.ways,
            self.shots,
            self.annotation,
            self.train_seeds or (None,),
        ):
            declared = METHODS.provides(method.name)
            if declared is not None and issubclass(declared, FewShotMethod):
                problem = declared.kwargs_problem(dict(method.kwargs), fold)
                if problem:
                    raise FsbenchError(f"methods: {method.row()}: {problem}")
            train = dataclasses.replace(self.train, **dict(method.train))
            if not train.stages and trainable[method.row()]:  # the method's own, if declared
                if declared is not None and issubclass(declared, FewShotMethod):
                    defaults = declared.default_stages()
                    if defaults:
                        where = f"{method.name}.default_stages()"
                        train = dataclasses.replace(train, stages=normalise_stages(defaults, where))
            if train_seed is not None:
                train = dataclasses.replace(train, seed=train_seed)
            if (
                not trainable[method.row()]
                and self.train_seeds
                and train_seed != self.train_seeds[0]
            ):
                continue  # an untrained method has no training seed: once
            home = Cell(
                grid=self.name,
                method=method,
                dataset=self.dataset,
                fold=fold,
                way=way,
                shot=shot,
                annotation=annotation,
                protocol=self.protocol,
                input_size=method.input_size or input_size,
                episodes=self.episodes or protocol.episodes,
                seeds=tuple(self.seeds or protocol.seeds),
                train=train if trainable[method.row()] else None,
                eval_precision=self.eval_precision,
                evaluators=self.evaluators,
                train_replicate=bool(self.train_seeds) and trainable[method.row()],
                sampler=sampler,
                preset=protocol,
            )
            homes.append(home)
        homes = _link_init_from(homes, self.methods, trainable)
        homes = [self._shared_shot(home) for home in homes]
        for home in homes:
            for scored, (preset, scored_sampler, size) in scoring.items():
                if scored == self.protocol:
                    cells.append(home)
                    continue
                cells.append(
                    dataclasses.replace(
                        home,
                        eval_protocol=scored,
                        input_size=home.method.input_size or size,
                        episodes=self.episodes or preset.episodes,
                        seeds=tuple(self.seeds or preset.seeds),
                        sampler=scored_sampler,
                        preset=preset,
                        trained_as=home,
                    )
                )
            if self.sensitivity:  # the same model scored at the other label resolution
                flipped = "original" if home.preset.score_resolution == "input" else "input"
                cells.append(
                    dataclasses.replace(
                        home,
                        score_resolution=flipped,
                        preset=dataclasses.replace(home.preset, score_resolution=flipped),
                        trained_as=home,
                    )
                )
        return cells

    def _shared_shot(self, home: Cell) -> Cell:
        """`train_shot` (the entry's, else the grid's): a trained cell of another shot is scored
        with the model trained at that shot (the model's own cell, at that shot)."""
        shot = home.method.train_shot or self.train_shot
        if home.train is None or not shot or shot == home.shot:
            return home
        model = dataclasses.replace(home, shot=shot)
        return dataclasses.replace(home, train_shot=shot, trained_as=model)

    def _scoring(self, dataset: str) -> dict:
        """Each protocol the grid scores under → (resolved preset, sampler, input size), its
        input size checked against every method's rule."""
        scoring = {}
        for name in self.eval_protocols or (self.protocol,):
            preset = resolve(name, dataset)
            try:
                sampler = check_sampler(self.sampler, preset, dataset)
            except FsbenchError as error:
                raise FsbenchError(f"eval_protocols: {name}: {error}") from None
            size = self.input_size or preset.input_size
            for method in self.methods:
                _check_input_size(method, size, name, False, self.train)
            scoring[name] = (preset, sampler, size)
        return scoring


def _link_init_from(homes: list[Cell], methods, trainable: dict) -> list[Cell]:
    """Each `init_from:` entry's cells, linked to the cell (same fold, way, shot and training
    seed) whose trained model they start from; upstream entries first, so a chain links whole."""
    by_row = {m.row(): m for m in methods}
    for spec in methods:
        if spec.init_from and not (trainable[spec.init_from] or by_row[spec.init_from].checkpoint):
            raise FsbenchError(
                f"methods: {spec.row()}: init_from {spec.init_from!r} names an entry without a "
                "model to start from (it neither trains nor loads a checkpoint)"
            )
    order, placed = [], set()
    while len(order) < len(methods):  # entries after the ones they start from (no cycles)
        for spec in methods:
            if spec.row() not in placed and (not spec.init_from or spec.init_from in placed):
                order.append(spec)
                placed.add(spec.row())
    linked: dict[int, Cell] = {}  # id of a home as expanded → the home, linked
    for spec in order:
        for original in (h for h in homes if h.method.row() == spec.row()):
            home = original
            if spec.init_from:
                seed = home.train.seed if home.train else None
                upstream = next(
                    linked[id(h)]
                    for h in homes
                    if h.method.row() == spec.init_from
                    and (h.fold, h.way, h.shot) == (home.fold, home.way, home.shot)
                    and (h.train is None or h.train.seed == seed)
                )
                home = dataclasses.replace(original, upstream=upstream)
            linked[id(original)] = home
    return [linked[id(h)] for h in homes]


def _strict(methods) -> tuple:
    """The entries whose methods saw nothing beyond ImageNet; the others named in one line."""
    kept, left = [], []
    for method in methods:
        declared = METHODS.provides(method.name)
        data = getattr(declared, "pretraining", ()) if declared is not None else ()
        (left if data else kept).append(
            method if not data else f"{method.row()} ({', '.join(data)})"
        )
    if left:
        print(f"fsbench: strict: left out {', '.join(left)} (pretrained beyond ImageNet)",
              file=sys.stderr)  # fmt: skip
    if not kept:
        raise FsbenchError("strict: true leaves no method (every one was pretrained beyond "
                           "ImageNet); drop strict or add a method")  # fmt: skip
    return tuple(kept)


def _check_input_size(method: MethodSpec, size: int, protocol: str, trains: bool, train) -> None:
    """The method's input-size rule (declared on its class), for the test input (the entry's
    own `input_size`, else the grid's `size`) and, if it trains, the training input: one line
    naming the method, the size and the sizes that fit."""
    declared = METHODS.provides(method.name)
    if declared is None:
        return
    if method.input_size:
        sizes = {"its input_size": method.input_size}
    else:
        sizes = {f"protocol {protocol}'s input size": size}
    training = dataclasses.replace(train, **dict(method.train)).input_size
    if trains and training:
        sizes["train.input_size"] = training
    for where, value in sizes.items():
        problem = declared.input_size_problem(value)
        if problem:
            raise FsbenchError(
                f"method {method.row()}: {where} {value} does not fit: {problem}; set "
                "input_size (or train.input_size) in the grid to one that fits"
            )


def _is_trainable(registry, method: MethodSpec) -> bool:
    """Read off the class the builder declares (no model is built, no weight file read); its
    keywords are checked against the builder's signature. A builder that declares no class is
    built once (RNG state untouched) to ask it."""
    builder, declared = registry.get(method.name), registry.provides(method.name)
    try:
        if declared is not None:
            inspect.signature(builder).bind(**method.kwargs)
            return bool(declared.trainable)
        with torch.random.fork_rng():
            return bool(registry.build(method.name, **method.kwargs).trainable)
    except TypeError as error:
        raise FsbenchError(f"method {method.name}: bad keyword ({error})") from None
