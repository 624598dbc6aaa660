"""Cell records: what a finished cell is, written and read by this module alone.

`results/<grid>/cells/<cell id>.json` holds one `CellRecord`: the cell's config (its identity),
the protocol as resolved for its dataset, per-seed results (`SeedRecord`: every registered
metric, class IoU and the per-episode counts they come from), their summary, training, the
checkpoint, kept predictions, timings and environment. `CellRecord.from_json` is the one check of
a file (version, id = file name, grid, fields, metrics equal to what the counts give); a key it
does not know (a later version's) is kept, so reading and writing back loses nothing. Imports
neither torch nor ray.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsbench.benchmarks.grid.identity import CellConfig
from fsbench.benchmarks.metrics import METRICS, EpisodeCounts
from fsbench.core import FsbenchError, canonical_sha256
from fsbench.datasets.protocols import Protocol, resolve

RESULT_VERSION = 1


class RecordError(FsbenchError):
    """A cell file that must not be used: the message says why."""


def finite_or_none(value):
    """JSON has no NaN: an undefined IoU (class never in an episode) is written as null."""
    return None if value is None or value != value else float(value)


@dataclass(frozen=True)
class SeedRecord:
    """One test seed of a cell: its manifest, metrics and the per-episode counts behind them."""

    seed: int
    manifest_fingerprint: str
    metrics: dict[str, float]  # every metric registered when it was written (METRICS)
    class_iou: dict[str, float | None]  # class id (str) → IoU; None: never in an episode
    episodes: int
    counts: dict  # EpisodeCounts.to_json()
    eval_seconds: float = 0.0
    encoded_images: int | None = None
    distinct_images: int | None = None
    device: str = ""
    # Peaks of the evaluation task that served this seed: its process's resident memory and the
    # disk its feature cache spilled (None in records written before they were measured).
    peak_rss_bytes: int | None = None
    spill_bytes: int | None = None
    evaluators: dict = field(default_factory=dict)  # the grid's evaluators: name → result()

    @classmethod
    def from_evaluation(cls, output: dict) -> SeedRecord:
        """The metrics of one seed's evaluation (a task's output) from its per-episode counts."""
        counts = EpisodeCounts.from_json(output["counts"])
        return cls(
            seed=output["seed"],
            manifest_fingerprint=output["manifest_fingerprint"],
            metrics={name: counts.value(name) for name in METRICS},
            class_iou={str(c): finite_or_none(v) for c, v in counts.class_iou().items()},
            episodes=len(counts.per_class),
            counts=output["counts"],
            eval_seconds=output["eval_seconds"],
            encoded_images=output["encoded_images"],
            distinct_images=output.get("distinct_images"),
            device=output["device"],
            peak_rss_bytes=output.get("peak_rss_bytes"),
            spill_bytes=output.get("spill_bytes"),
            evaluators=dict(output.get("evaluators") or {}),
        )

    def metric(self, name: str) -> float:
        """A metric as recorded; one registered after the record was written, from the counts."""
        if name in self.metrics:
            return self.metrics[name]
        return self.episode_counts().value(name)

    def episode_counts(self) -> EpisodeCounts:
        return EpisodeCounts.from_json(self.counts)

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "manifest_fingerprint": self.manifest_fingerprint,
            **self.metrics,
            "class_iou": self.class_iou,
            "episodes": self.episodes,
            "eval_seconds": self.eval_seconds,
            "encoded_images": self.encoded_images,
            "distinct_images": self.distinct_images,
            "device": self.device,
            "peak_rss_bytes": self.peak_rss_bytes,
            "spill_bytes": self.spill_bytes,
            **({"evaluators": self.evaluators} if self.evaluators else {}),
            "counts": self.counts,
        }

    @classmethod
    def from_json(cls, raw: dict) -> SeedRecord:
        return cls(
            seed=raw["seed"],
            manifest_fingerprint=raw["manifest_fingerprint"],
            metrics={m: raw[m] for m in METRICS if m in raw},
            class_iou=dict(raw.get("class_iou") or {}),
            episodes=raw.get("episodes", 0),
            counts=raw["counts"],
            eval_seconds=raw.get("eval_seconds", 0.0),
            encoded_images=raw.get("encoded_images"),
            distinct_images=raw.get("distinct_images"),
            device=raw.get("device", ""),
            peak_rss_bytes=raw.get("peak_rss_bytes"),
            spill_bytes=raw.get("spill_bytes"),
            evaluators=dict(raw.get("evaluators") or {}),
        )


def summarise(seeds: list[SeedRecord]) -> dict:
    """Mean and population std over seeds (PANet's convention) of every metric, and class IoU
    over the seeds in which the class occurred (None when it never did)."""
    classes = list(seeds[0].class_iou)
    per_class = np.array(
        [[np.nan if s.class_iou[c] is None else s.class_iou[c] for c in classes] for s in seeds],
        dtype=float,
    )
    summary = {}
    for name in METRICS:
        values = np.array([s.metric(name) for s in seeds])
        summary[f"{name}_mean"], summary[f"{name}_std"] = float(values.mean()), float(values.std())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        class_means = np.nanmean(per_class, axis=0).tolist()
    return {
        **summary,
        "class_iou_mean": {c: finite_or_none(v) for c, v in zip(classes, class_means)},
        "seeds": len(seeds),
    }


def _first_difference(recorded, expected, partial: bool = False, path: str = "") -> str | None:
    """Where `recorded` differs from `expected` (as `[key]…`), None when equal to 1e-9. With
    `partial`, top-level keys `expected` has but `recorded` lacks (metrics registered after the
    record was written) are not differences."""
    if isinstance(expected, dict):
        if not isinstance(recorded, dict):
            return path or "(whole)"
        if set(recorded) - set(expected) or (not partial and set(expected) - set(recorded)):
            extra = sorted(set(recorded) ^ set(expected), key=str)[0]
            return f"{path}[{extra!r}]"
        for key in recorded:
            where = _first_difference(recorded[key], expected[key], path=f"{path}[{key!r}]")
            if where is not None:
                return where
        return None
    if expected is None or recorded is None or isinstance(recorded, bool):
        return None if recorded is expected else path
    if not isinstance(recorded, (int, float)):
        return path
    return None if np.isclose(recorded, expected, rtol=0, atol=1e-9) else path


# The names the bundled methods printed under before each declared its own at registration:
# a record written then (without `method_display`) still prints as it did.
LEGACY_DISPLAY = {
    "panet": "PANet",
    "panet_nopar": "PANet w/o PAR",
    "prototype_notrain": "PANet, untrained",
    "sgone": "SG-One",
    "canet": "CANet",
    "finetune_linear": "Linear probe",
    "linear_probe": "Linear probe",
    "finetune": "Fine-tuning (OSLSM)",
    "all_background": "All background",
    "all_foreground": "All foreground",
    "hsnet": "HSNet",
    "pfenet": "PFENet",
}


@dataclass(frozen=True)
class CellRecord:
    """A finished cell, as its file holds it."""

    cell_id: str
    grid: str
    title: str
    config: CellConfig
    summary: dict  # summarise(seeds)
    seeds: tuple[SeedRecord, ...]
    protocol: dict = field(default_factory=dict)  # Protocol.to_dict(), resolved for the dataset
    row_index: int = 0
    display: str | None = None  # the grid's `display:` for the row (not identity)
    # the name the method declared at registration (register_method(display=…)), as it ran
    method_display: str | None = None
    train: dict | None = None  # curve, seconds, selection; None: not trained
    checkpoint: str | None = None  # relative to the grid folder
    checkpoint_bytes: int | None = None
    checkpoint_sha256: str | None = None
    model_key: str = ""
    imports: tuple[str, ...] = ()  # modules that registered the grid's own methods/datasets
    plugin_paths: tuple[str, ...] = ()
    qualitative: tuple[dict, ...] = ()  # kept predictions: {seed, episode, prediction}
    timings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    depends_on: dict = field(default_factory=dict)  # grid/provenance.py: what the numbers rest on
    finished_at: str = ""
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read
    version: int = RESULT_VERSION

    # -- what readers ask -------------------------------------------------------------------
    def mean(self, metric: str) -> float:
        """The mean over seeds of a metric (from the counts when recorded before it existed)."""
        key = f"{metric}_mean"
        if key in self.summary:
            return self.summary[key]
        return float(np.mean([s.metric(metric) for s in self.seeds]))

    def seed(self, seed: int) -> SeedRecord:
        return next(s for s in self.seeds if s.seed == seed)

    def preset(self) -> Protocol:
        """The protocol the cell was scored under, as the run resolved and recorded it."""
        if self.protocol:
            return Protocol.from_dict(self.protocol)
        return resolve(self.config.protocol, self.config.dataset_name)

    # -- the file ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {
            "version": self.version,
            "cell_id": self.cell_id,
            "grid": self.grid,
            "row_index": self.row_index,
            "title": self.title,
            "display": self.display,
            **({"method_display": self.method_display} if self.method_display else {}),
            "config": self.config.to_json(),
            "protocol": self.protocol,
            "summary": self.summary,
            "seeds": [s.to_json() for s in self.seeds],
            "train": self.train,
            "checkpoint": self.checkpoint,
        }
        if self.checkpoint_bytes is not None or self.checkpoint_sha256 is not None:
            data["checkpoint_bytes"] = self.checkpoint_bytes
            data["checkpoint_sha256"] = self.checkpoint_sha256
        data.update(
            {
                "model_key": self.model_key,
                "imports": list(self.imports),
                "plugin_paths": list(self.plugin_paths),
                "qualitative": list(self.qualitative),
                "timings": self.timings,
                "environment": self.environment,
                **({"depends_on": self.depends_on} if self.depends_on else {}),
                "finished_at": self.finished_at,
            }
        )
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, raw, file_id: str | None = None, grid: str | None = None) -> CellRecord:
        """The record of a file's JSON, checked; `RecordError` says why it must not be used:
        wrong version, an id that is not its file's name (a copy), another grid's cell, missing
        fields, or numbers that its own per-episode counts do not give (an edited file)."""
        if not isinstance(raw, dict):
            raise RecordError(f"not a cell record (a JSON {type(raw).__name__}, not an object)")
        if raw.get("version") != RESULT_VERSION:
            raise RecordError(f"result version {raw.get('version')!r}, expected {RESULT_VERSION}")
        if file_id is not None and raw.get("cell_id") != file_id:
            raise RecordError(f"its cell_id {raw.get('cell_id')!r} is not its file name (a copy?)")
        if grid is not None and raw.get("grid") != grid:
            raise RecordError(f"a cell of grid {raw.get('grid')!r}, not of {grid!r}")
        try:
            record = cls._fields_of(raw)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise RecordError(f"incomplete record ({type(error).__name__}: {error})") from None
        record._check_numbers()
        return record

    @classmethod
    def _fields_of(cls, raw: dict) -> CellRecord:
        config = CellConfig.from_json(raw["config"])
        if not raw["seeds"]:
            raise RecordError("no seed results")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "seeds", "config"}
        values = {k: raw[k] for k in known if k in raw}
        for key in ("imports", "plugin_paths", "qualitative"):
            values[key] = tuple(values.get(key) or ())
        if "method_display" not in raw:  # written before methods declared their names
            values["method_display"] = LEGACY_DISPLAY.get(config.method)
        return cls(
            **values,
            config=config,
            seeds=tuple(SeedRecord.from_json(s) for s in raw["seeds"]),
            extra={k: v for k, v in raw.items() if k not in known | {"seeds", "config"}},
        )

    def _check_numbers(self) -> None:
        """Every number of the record is recomputed from its per-episode counts: each seed's
        metrics, class IoU and episode count, then the whole summary (means, stds, class IoU
        means, seeds). An edited number anywhere is refused, not carried into tables or MLflow."""
        try:
            for seed in self.seeds:
                counts = seed.episode_counts()
                for metric, recorded in seed.metrics.items():  # metrics added later: absent
                    value = counts.value(metric)
                    if not np.isclose(recorded, value, rtol=0, atol=1e-9):
                        raise RecordError(
                            f"seed {seed.seed}: {metric} {recorded} is not what its "
                            f"per-episode counts give ({value:.6f}); edited?"
                        )
                class_iou = {str(c): finite_or_none(v) for c, v in counts.class_iou().items()}
                where = _first_difference(seed.class_iou, class_iou)
                if where is not None:
                    raise RecordError(
                        f"seed {seed.seed}: class_iou{where} is not what its per-episode "
                        "counts give; edited?"
                    )
                if seed.episodes != len(counts.per_class):
                    raise RecordError(
                        f"seed {seed.seed}: episodes {seed.episodes} but its counts hold "
                        f"{len(counts.per_class)}; edited?"
                    )
            where = _first_difference(self.summary, summarise(list(self.seeds)), partial=True)
            if where is not None:
                raise RecordError(f"its summary{where} is not what its seeds give; edited?")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise RecordError(f"incomplete record ({type(error).__name__}: {error})") from None

    @classmethod
    def read(cls, path: Path, grid: str | None = None) -> CellRecord:
        """A cell file, checked (its id must be its file name)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RecordError(
                f"unreadable ({type(error).__name__}: a truncated or damaged file?)"
            ) from None
        return cls.from_json(raw, path.stem, grid)


def read_cells(cells_dir: Path, grid: str | None = None, rejected: dict | None = None):
    """Every valid cell file of a folder, in file-name order; each rejected one goes to
    `rejected` (file name → why)."""
    records = []
    for path in sorted(Path(cells_dir).glob("*.json")):
        try:
            records.append(CellRecord.read(path, grid))
        except RecordError as error:
            if rejected is not None:
                rejected[path.name] = str(error)
    return records


def other_versions(cells, records) -> dict[str, dict]:
    """Per method: the finished records that are one of `cells` but for the method's code
    version — {"now": version, "then": {version: count}} (what `fsbench run` says it
    recomputes instead of reusing)."""
    wanted = {
        canonical_sha256(cell.settings().identity(version=False)): cell.settings() for cell in cells
    }
    found: dict[str, dict] = {}
    for record in records:
        config = wanted.get(canonical_sha256(record.config.identity(version=False)))
        if config is None or config.method_version == record.config.method_version:
            continue
        entry = found.setdefault(config.method, {"now": config.method_version, "then": {}})
        then = record.config.method_version
        entry["then"][then] = entry["then"].get(then, 0) + 1
    return found
