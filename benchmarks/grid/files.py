"""Grid files → a `GridSpec` (cells.py expands it): YAML with includes, `key=value` overrides,
every value checked with a one-line error naming the fix."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fsbench.benchmarks.grid.cells import Cell, GridSpec  # noqa: F401 (re-exported)
from fsbench.benchmarks.grid.entries import _methods, _train_overrides
from fsbench.benchmarks.grid.recipes import PRECISIONS, TrainConfig
from fsbench.benchmarks.grid.yaml_text import load_value, load_yaml
from fsbench.benchmarks.metrics import EVALUATORS
from fsbench.core import FsbenchError, import_plugins, non_finite_path, short_repr
from fsbench.datasets.protocols import (
    PROTOCOLS,
    check_sampler,
    get_protocol,
)
from fsbench.datasets.registry import DATASETS

GRID_KEYS = {
    "name",
    "seed_summary",
    "sensitivity",
    "train_shot",
    "evaluators",
    "include",
    "imports",
    "train_seeds",
    "compare",
    "dataset",
    "protocol",
    "eval_protocols",
    "sampler",
    "input_size",
    "episodes",
    "seeds",
    "folds",
    "ways",
    "shots",
    "annotation",
    "methods",
    "train",
    "device",
    "eval_batch_size",
    "cache_bytes",
    "spill_bytes",
    "eval_precision",
    "train_workers",
    "train_gpus",
    "eval_gpus",
    "checkpoint_every",
    "smoke",
    "strict",
}
ANNOTATIONS = ("mask", "scribble", "bbox")
# A grid's name is a folder under --results: one path component, nothing to climb out with.
GRID_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_EPISODES = 100_000  # per seed; the protocols use 1,000 (manifests are held in memory)


def check_grid_name(name) -> str:
    if not isinstance(name, str) or not GRID_NAME.fullmatch(name) or set(name) == {"."}:
        raise FsbenchError(
            f"grid name {name!r}: use only letters, digits, '_', '.' and '-' (it names the "
            "grid's folder under --results); set `name:` in the grid file"
        )
    return name


MAX_SEED = 2**32 - 1  # numpy's and the official scripts' seeds are 32-bit


# -- loading ---------------------------------------------------------------------------------
def _merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, nested mappings merged key by key. A `dataset:` that names
    another dataset replaces the base's whole section: the real set's `data_root` must not leak
    into a smoke run's generated set (it would become its cache folder)."""
    merged = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        if key == "dataset" and nested:
            nested = value.get("name", merged[key].get("name")) == merged[key].get("name")
        if nested and key != "methods":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_grid_file(path: Path, seen=()) -> dict:
    """YAML of a grid with its `include:` chain resolved (included first, this file on top)."""
    path = Path(path)
    if not path.is_file():
        bundled = Path(__file__).parents[1] / "configs" / path.name
        if path.parent == Path(".") and bundled.is_file():
            path = bundled
        else:
            raise FsbenchError(
                f"{path}: grid file not found (bundled grids: {', '.join(bundled_grids())})"
            )
    if path.resolve() in seen:
        raise FsbenchError(f"{path}: include cycle ({' → '.join(str(s) for s in seen)})")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FsbenchError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise FsbenchError(f"{path}: a grid file must be a mapping of keys")
    include = raw.pop("include", None)
    includes = include if isinstance(include, list) else [include] if include else []
    if not all(isinstance(name, str) and name for name in includes):
        raise FsbenchError(
            f"{path}: include: {include!r} is not a grid file name or a list of them"
        )
    base: dict = {}
    for name in includes:  # in order: a later file overrides an earlier one, this file all
        base = _merge(base, read_grid_file(path.parent / name, (*seen, path.resolve())))
    if includes:
        raw = _merge(base, raw)
    raw.setdefault("name", path.stem)
    return raw


def check_dataset_keys(dataset: dict) -> None:
    """The `dataset:` keys must be parameters of the dataset's builder (or of the class it
    builds, where the builder forwards **kwargs): a typo (`n_imgaes`) is refused here, not after
    a default-sized set has been generated."""
    import difflib
    import inspect

    builder = DATASETS.get(dataset["name"])
    accepted: set[str] = set()
    for function in (builder, DATASETS.provides(dataset["name"])):
        if function is None:
            return
        parameters = inspect.signature(function).parameters.values()
        accepted |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    else:
        return  # the built class takes **kwargs too: anything may be meant
    accepted -= {"self", "protocol"}
    for key in dataset:
        if key != "name" and key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FsbenchError(
                f"dataset: {dataset['name']} has no setting {key!r}; {hint}"
                f"(it takes {', '.join(sorted(accepted))})"
            )


def bundled_grids() -> list[str]:
    return sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key=value` / `train.steps=100` (values parsed as YAML) on top of a grid dict."""
    raw = dict(raw)
    for item in overrides:
        key, equals, text = item.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise FsbenchError(
                f"override {item!r} is not key=value (e.g. shots=[1] or train.steps=100)"
            )
        value = load_value(
            text,
            f"override {item!r}",
            "quote the whole override for the shell, e.g. 'shots=[1, 5]'",
        )
        *parents, leaf = parts
        target = raw
        for depth, part in enumerate(parents):
            current = target.get(part)
            if current is not None and not isinstance(current, dict):
                where = ".".join(parents[: depth + 1])
                raise FsbenchError(
                    f"override {item!r}: {where} is {current!r}, not a mapping of keys; "
                    f"set it whole ({where}=...)"
                )
            target[part] = dict(current or {})
            target = target[part]
        target[leaf] = value
    return raw


def _tuple_of_ints(raw, key, low=None, high=None):
    values = raw[key] if isinstance(raw[key], list) else [raw[key]]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FsbenchError(f"{key}: expected an integer or a list of integers, got {raw[key]!r}")
    for v in values:
        if (low is not None and v < low) or (high is not None and v > high):
            bound = f"{low}…{high}" if high is not None else f"≥ {low}"
            raise FsbenchError(f"{key}: {v} is impossible (must be {bound})")
    return tuple(values)


def _single_int(raw, key, low, high):
    """One integer in low…high, or None when the key is absent (the protocol's value)."""
    if raw.get(key) is None:
        return None
    if isinstance(raw[key], list):
        raise FsbenchError(f"{key}: expected one integer, got {raw[key]!r}")
    return _tuple_of_ints(raw, key, low, high)[0]


def _imports(raw) -> tuple[str, ...]:
    imports = raw.get("imports") or []
    imports = [imports] if isinstance(imports, str) else imports
    if not isinstance(imports, list) or not all(isinstance(m, str) and m for m in imports):
        raise FsbenchError(
            f"imports: expected module names, e.g. [my_pkg.methods], got {imports!r}"
        )
    return tuple(dict.fromkeys(imports))


def _compare(raw, methods) -> tuple[tuple[str, str], ...]:
    """`compare: [[variant, base], …]`: rows (method labels) of the grid, compared paired."""
    if not raw:
        return ()
    pairs = raw if isinstance(raw, list) else [raw]
    if not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise FsbenchError(
            f"compare: expected pairs of rows, e.g. [[panet, panet_nopar]], got {raw!r}"
        )
    return tuple((a, b) for a, b in pairs)


def _sampler(value, protocol: str) -> str | None:
    if value is None:
        return None
    try:
        return check_sampler(str(value), get_protocol(protocol))
    except FsbenchError as error:
        raise FsbenchError(f"sampler: {error}") from None


def _gpu_share(value) -> float | None:
    """`eval_gpus:` a share of one GPU in (0, 1] (several evaluations pack onto a GPU), or None."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1
    if value is not None and bad:
        raise FsbenchError(f"eval_gpus: {value!r} is not a share in (0, 1] (0.25: four per GPU)")
    return None if value is None else float(value)


def _eval_protocols(raw) -> tuple[str, ...]:
    """`eval_protocols:`: protocol names (each model is also scored under each), or ()."""
    names = [] if raw is None else raw if isinstance(raw, list) else [raw]
    bad = [n for n in names if not isinstance(n, str) or n not in PROTOCOLS]
    if raw is not None and (bad or not names or len(set(names)) != len(names)):
        raise FsbenchError(
            f"eval_protocols: expected distinct protocol names from {', '.join(PROTOCOLS)} "
            f"(e.g. [panet, pfenet, hsnet]), got {short_repr(raw)}"
        )
    return tuple(names)


def _seed_summary(value) -> str:
    if value not in SEED_SUMMARIES:
        raise FsbenchError(
            f"seed_summary: {short_repr(value)} is not one of {', '.join(SEED_SUMMARIES)} "
            "(best adds a column of each fold's best test seed, marked: it selects on the test set)"
        )
    return value


SEED_SUMMARIES = ("mean", "best")


def _flag(raw: dict, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise FsbenchError(f"{key}: {short_repr(value)} is not true or false")
    return value


def _evaluators(raw) -> tuple[str, ...]:
    """`evaluators:`: names of registered evaluators (fsbench.register_evaluator), or ()."""
    names = [] if raw is None else raw if isinstance(raw, list) else [raw]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise FsbenchError(f"evaluators: expected distinct evaluator names, got {short_repr(raw)}")
    for name in names:
        EVALUATORS.get(name)  # unknown: one line listing the registered ones
    return tuple(names)


def parse_grid(raw: dict, plugin_paths=()) -> GridSpec:
    """Validate a grid dict into a GridSpec: unknown keys and impossible values are errors.
    Its `imports:` are imported first (with `plugin_paths` on sys.path): they register the
    methods and datasets the grid may name."""
    raw = dict(raw)
    raw.pop("include", None)
    raw.pop("smoke", None)
    bad_number = non_finite_path(raw)
    if bad_number:
        raise FsbenchError(
            f"{bad_number}: NaN or infinity is not a setting (training would record a silent 0); "
            "write a finite number"
        )
    imports = _imports(raw)
    import_plugins(imports, tuple(plugin_paths))
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise FsbenchError(
            f"unknown grid key(s) {sorted(unknown)}; known keys: {sorted(GRID_KEYS)}"
        )
    if "dataset" not in raw or "methods" not in raw:
        raise FsbenchError("a grid needs at least `dataset:` and `methods:`")
    check_grid_name(raw.get("name", "grid"))
    # `dataset:` one dataset, or a list (test sets scored by the same models: a cross-domain
    # grid, whose models train on `train.dataset`)
    written = raw["dataset"] if isinstance(raw["dataset"], list) else [raw["dataset"]]
    if not written:
        raise FsbenchError("dataset: an empty list; name a dataset (e.g. pascal5i) or several")
    datasets = []
    for item in written:
        dataset = item if isinstance(item, dict) else {"name": item}
        if not isinstance(dataset.get("name"), str):
            raise FsbenchError(f"dataset: {item!r} names no dataset (e.g. pascal5i)")
        check_dataset_keys(dataset)
        datasets.append(dataset)
    dataset = datasets[0]
    protocol = raw.get("protocol", "panet")
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise FsbenchError(f"protocol: unknown {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    train_raw = dict(_train_overrides(raw.get("train") or {}, "train"))
    annotation = raw.get("annotation", ["mask"])
    annotation = tuple(annotation if isinstance(annotation, list) else [annotation])
    bad = [a for a in annotation if a not in ANNOTATIONS]
    if bad:
        raise FsbenchError(f"annotation: {bad} not supported (supported: {list(ANNOTATIONS)})")
    folds = _tuple_of_ints({**{"folds": [0, 1, 2, 3]}, **raw}, "folds", 0, 9)  # LVIS-92i: 10
    spec = GridSpec(
        name=str(raw.get("name", "grid")),
        dataset=dataset,
        test_datasets=tuple(datasets) if len(datasets) > 1 else (),
        methods=_methods(raw["methods"]),
        protocol=protocol,
        eval_protocols=_eval_protocols(raw.get("eval_protocols")),
        sampler=_sampler(raw.get("sampler"), protocol),
        # 0 is impossible, not "the protocol's": only an absent (or null) key means that.
        input_size=_single_int(raw, "input_size", 16, 4096),
        train_shot=_single_int(raw, "train_shot", 1, 1000) or 0,
        sensitivity=_flag(raw, "sensitivity"),
        seed_summary=_seed_summary(raw.get("seed_summary", "mean")),
        episodes=_single_int(raw, "episodes", 1, MAX_EPISODES),
        seeds=_tuple_of_ints(raw, "seeds", 0, MAX_SEED) if raw.get("seeds") is not None else None,
        folds=folds,
        ways=_tuple_of_ints({"ways": [1], **raw}, "ways", 1, 5),
        shots=_tuple_of_ints({"shots": [1, 5], **raw}, "shots", 1),
        annotation=annotation,
        train=TrainConfig(**train_raw),
        device=str(raw.get("device", "auto")),
        eval_batch_size=_tuple_of_ints({"eval_batch_size": 16, **raw}, "eval_batch_size", 1)[0],
        cache_bytes=_tuple_of_ints({"cache_bytes": 2 << 30, **raw}, "cache_bytes", 0)[0],
        spill_bytes=(
            None if raw.get("spill_bytes") is None else _tuple_of_ints(raw, "spill_bytes", 0)[0]
        ),
        eval_precision=str(raw.get("eval_precision", "fp32")),
        evaluators=_evaluators(raw.get("evaluators")),
        train_workers=_tuple_of_ints({"train_workers": 1, **raw}, "train_workers", 0, 64)[0],
        train_gpus=_tuple_of_ints({"train_gpus": 1, **raw}, "train_gpus", 1, 64)[0],
        eval_gpus=_gpu_share(raw.get("eval_gpus")),
        checkpoint_every=_tuple_of_ints({"checkpoint_every": 1000, **raw}, "checkpoint_every", 0)[
            0
        ],
        imports=imports,
        plugin_paths=tuple(plugin_paths),
        train_seeds=(
            _tuple_of_ints(raw, "train_seeds", 0, MAX_SEED) if raw.get("train_seeds") else None
        ),
        compare=_compare(raw.get("compare"), raw["methods"]),
        strict=_flag(raw, "strict"),
    )
    rows = {m.row() for m in spec.methods}
    unknown_rows = sorted({r for pair in spec.compare for r in pair} - rows)
    if unknown_rows:
        raise FsbenchError(
            f"compare: {unknown_rows} are not rows of the grid (its rows: {sorted(rows)})"
        )
    if spec.eval_precision not in PRECISIONS:
        raise FsbenchError(
            f"eval_precision: {spec.eval_precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if spec.device not in ("auto", "cpu", "cuda") and not spec.device.startswith("cuda:"):
        raise FsbenchError(f"device: {spec.device!r} is not auto, cpu or cuda[:N]")
    return spec


def load_grid(path, overrides=(), smoke: bool = False, imports=()) -> GridSpec:
    """A grid file (+ its `smoke:` section when `smoke`) with `key=value` overrides on top;
    `imports` (the CLI's --import) join the grid's own. Modules are also found in the grid
    file's folder."""
    raw = read_grid_file(Path(path))
    if imports:
        raw["imports"] = [*_imports(raw), *imports]
    if smoke:
        if not raw.get("smoke"):
            raise FsbenchError(f"{path}: has no `smoke:` section to run a smoke-sized version")
        raw = _merge(raw, raw["smoke"])
        raw["name"] = f"{raw['name']}_smoke"
    folders = [Path(path).resolve().parent] if Path(path).is_file() else []
    paths = tuple(dict.fromkeys(str(f) for f in (*folders, Path.cwd())))
    return parse_grid(apply_overrides(raw, list(overrides)), paths)
