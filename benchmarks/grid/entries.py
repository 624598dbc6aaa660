"""A grid's `methods:` entries: name, keywords, sweeps, labels, training recipe, and released
weights (`checkpoint:`), validated into `MethodSpec`s."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from fsbench.benchmarks.grid.recipes import MAPPINGS, RECIPES, TrainConfig, normalise_stages
from fsbench.core import FsbenchError, short_repr
from fsbench.methods import METHODS


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kwargs: dict = field(default_factory=dict)
    label: str = ""  # the row name in tables; defaults to name + swept values
    train: tuple = ()  # (key, value) overrides of the grid's training settings (its recipe)
    display: str = ""  # the name tables and figures print (default: the method's usual name)
    # released weights to evaluate instead of training: (path, "official" | "fsbench", sha256)
    checkpoint: tuple = ()
    # the row whose trained model (same fold and training seed) this one starts from
    init_from: str = ""
    train_shot: int = 0  # score every shot with the model trained at this shot (0: the grid's)
    # this entry's test input side when its input rule rejects the grid's (PFENet's
    # (S − 1) % 8 == 0 in a 400-px grid); 0: the grid's
    input_size: int = 0

    def row(self) -> str:
        return self.label or self.name


def _train_overrides(raw: dict, where: str) -> tuple:
    """Validated training keys as a sorted (key, value) tuple (lists become tuples)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(raw, dict):
        raise FsbenchError(
            f"{where}: expected a mapping of settings (e.g. {{steps: 1000}}), got {raw!r}"
        )
    if "recipe" in raw:  # a named recipe, under the keys written beside it
        raw = dict(raw)
        name = raw.pop("recipe")
        if name not in RECIPES:
            raise FsbenchError(
                f"{where}.recipe: {name!r} is not a named recipe; known: {sorted(RECIPES)}"
            )
        raw = {**RECIPES[name], **raw}
    if set(raw) - fields:
        raise FsbenchError(
            f"{where}: unknown key(s) {sorted(set(raw) - fields)}; known: {sorted(fields)}"
        )
    items = []
    for key, value in raw.items():
        if key == "stages":
            items.append((key, normalise_stages(value, f"{where}.stages")))
            continue
        if key in MAPPINGS:
            if not isinstance(value, dict):
                if key == "dataset":
                    raise FsbenchError(
                        f"{where}.dataset: expected a dataset mapping, e.g. {{name: pascal5i, "
                        "data_root: …}} (the training data of a cross-domain grid)"
                    )
                example = "{bias: 2}" if key == "lr_mult" else "{backbone: eval}"
                raise FsbenchError(
                    f"{where}.{key}: expected a mapping of parameter group → value, e.g. {example}"
                )
            value = tuple(sorted(value.items()))
        elif isinstance(value, list):
            value = tuple(value)
        items.append((key, value))
    return tuple(sorted(items))


CHECKPOINT_FORMATS = ("fsbench", "official")


def _checkpoint(entry: dict) -> tuple:
    """(absolute path, format, sha256) of a method entry's `checkpoint:`, or ()."""
    if "checkpoint" not in entry:
        if "format" in entry:
            raise FsbenchError(f"methods: {entry['name']}: `format:` needs a `checkpoint:` path")
        return ()
    kind = entry.get("format", "fsbench")
    if kind not in CHECKPOINT_FORMATS:
        raise FsbenchError(
            f"methods: {entry['name']}: format {kind!r} is not one of {CHECKPOINT_FORMATS} "
            "(official: a state_dict saved by the method's official repository)"
        )
    path = Path(str(entry["checkpoint"])).expanduser().resolve()
    if not path.is_file():
        raise FsbenchError(
            f"methods: {entry['name']}: checkpoint {path} does not exist; give the path of the "
            "saved weights (a torch state dict)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return (str(path), kind, digest.hexdigest())


def _kind_of(default):
    for kind in (bool, int, float, str):  # bool first: True is an int too
        if isinstance(default, kind):
            return kind
    return None


def _check_kwargs(name: str, kwargs: dict) -> None:
    """Each keyword against the builder's default of the same name: an int setting takes an int,
    a float a finite number, a bool true/false, a str a string (a width of [1, 2] or NaN would
    otherwise fail deep inside the model, or train on NaN)."""
    try:
        parameters = inspect.signature(METHODS.get(name)).parameters
    except (TypeError, ValueError):  # a builder without a readable signature
        return
    wanted = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    for key, value in kwargs.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        kind = _kind_of(parameter.default)
        if kind is None:
            continue
        fits = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value),
            str: isinstance(value, str),
        }[kind]
        if not fits:
            raise FsbenchError(
                f"methods: {name}: kwarg {key}={short_repr(value)} is not {wanted[kind]} "
                f"(its default is {parameter.default!r})"
            )


def _check_name(entry: dict, key: str) -> None:
    """`label:` and `display:` are printed into tables, LaTeX and MLflow: plain text of one line,
    without the characters that would become markup there."""
    if key not in entry:
        return
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise FsbenchError(f"methods: {entry['name']}: {key} {short_repr(value)} is not a name")
    bad = sorted({c for c in value if not c.isprintable() or c in "<>|`\\"})
    if bad or len(value) > 120:
        shown = ", ".join(repr(c) for c in bad) if bad else f"{len(value)} characters"
        raise FsbenchError(
            f"methods: {entry['name']}: {key} {short_repr(value, 60)} holds {shown}; a {key} is "
            "one line of plain text under 120 characters (no newline, <, >, |, ` or \\)"
        )


def _methods(raw_methods) -> tuple[MethodSpec, ...]:
    if not raw_methods:
        raise FsbenchError("methods: the grid lists no method")
    specs = []
    if isinstance(raw_methods, str):  # methods=panet: the one method
        raw_methods = [raw_methods]
    if not isinstance(raw_methods, list):
        raise FsbenchError(
            f"methods: expected a list of methods, got {raw_methods!r} (e.g. methods=[panet])"
        )
    for entry in raw_methods:
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FsbenchError(
                f"methods: entry {entry!r} has no method name; write a name "
                "(e.g. panet) or a mapping with `name:` (e.g. {name: panet, kwargs: {alpha: 10}})"
            )
        entry = dict(entry)
        unknown = set(entry) - {
            "name",
            "kwargs",
            "sweep",
            "label",
            "train",
            "display",
            "checkpoint",
            "format",
            "init_from",
            "train_shot",
            "input_size",
        }
        if unknown:
            raise FsbenchError(
                f"methods: unknown key(s) {sorted(unknown)} "
                "(use name, kwargs, sweep, label, display, train, checkpoint, format, init_from, "
                "train_shot, input_size)"
            )
        own_size = entry.get("input_size", 0)
        if (
            isinstance(own_size, bool)
            or not isinstance(own_size, int)
            or not (own_size == 0 or 16 <= own_size <= 4096)
        ):
            raise FsbenchError(
                f"methods: {entry['name']}: input_size {short_repr(own_size)} is not a side of "
                "16…4096 px"
            )
        train_shot = entry.get("train_shot", 0)
        if isinstance(train_shot, bool) or not isinstance(train_shot, int) or train_shot < 0:
            raise FsbenchError(
                f"methods: {entry['name']}: train_shot {short_repr(train_shot)} is not a shot "
                "count (e.g. 1: every shot scored with the 1-shot model)"
            )
        if "init_from" in entry and not isinstance(entry["init_from"], str):
            raise FsbenchError(
                f"methods: {entry['name']}: init_from {short_repr(entry['init_from'])} is not "
                "the label of another entry"
            )
        checkpoint = _checkpoint(entry)
        recipe = _train_overrides(entry.get("train") or {}, f"methods: {entry['name']}: train")
        METHODS.get(entry["name"])  # unknown method: one clear error listing close names
        kwargs, sweep = dict(entry.get("kwargs") or {}), dict(entry.get("sweep") or {})
        for key in ("label", "display"):
            _check_name(entry, key)
        names = sorted(sweep)
        for values in itertools.product(
            *(sweep[n] if isinstance(sweep[n], list) else [sweep[n]] for n in names)
        ):
            swept = dict(zip(names, values))
            _check_kwargs(entry["name"], {**kwargs, **swept})
            suffix = ",".join(f"{n}={v}" for n, v in swept.items())
            label = entry.get("label") or entry["name"]
            display = str(entry.get("display") or "")
            specs.append(
                MethodSpec(
                    entry["name"],
                    {**kwargs, **swept},
                    f"{label}[{suffix}]" if suffix else label,
                    recipe,
                    f"{display} ({suffix})" if display and suffix else display,
                    checkpoint,
                    entry.get("init_from", ""),
                    train_shot,
                    own_size,
                )
            )
    variants = [
        (s.name, sorted(s.kwargs.items()), s.train, s.checkpoint, s.init_from, s.train_shot)
        for s in specs
    ]
    if len({repr(v) for v in variants}) != len(variants):
        raise FsbenchError(
            "methods: the same method with the same keywords, recipe and checkpoint is listed twice"
        )
    rows = [s.row() for s in specs]
    if len(set(rows)) != len(rows):
        raise FsbenchError(f"methods: two entries give the same row name; set `label:` ({rows})")
    _check_init_from(specs)
    return tuple(specs)


def _check_init_from(specs) -> None:
    """Each `init_from:` names another entry's row; no entry starts from itself, even through
    others (a cycle)."""
    by_row = {s.row(): s for s in specs}
    for spec in specs:
        if not spec.init_from:
            continue
        if spec.init_from == spec.row():
            raise FsbenchError(f"methods: {spec.row()}: init_from names the entry itself")
        if spec.init_from not in by_row:
            raise FsbenchError(
                f"methods: {spec.row()}: init_from {spec.init_from!r} is no entry of the grid "
                f"(its rows: {', '.join(by_row)})"
            )
        chain, current = [spec.row()], by_row[spec.init_from]
        while current is not None:
            if current.row() in chain:
                loop = " → ".join([*chain, current.row()])
                raise FsbenchError(f"methods: init_from runs in a cycle: {loop}")
            chain.append(current.row())
            current = by_row.get(current.init_from) if current.init_from else None
