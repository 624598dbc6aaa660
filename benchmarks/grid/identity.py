"""A cell's identity, typed: `CellConfig` is everything that decides a cell's result, and its
JSON is what a cell id hashes and what a cell record stores (store/records.py reads it back)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CONFIG_KEYS = ("row", "method", "dataset", "fold", "way", "shot", "protocol")
# Settings added after results existed: in a cell's JSON (and id) only when set.
LATER_WHEN_SET = (
    "checkpoint",
    "eval_protocol",
    "method_version",
    "init_from",
    "evaluators",
    "train_shot",
    "score_resolution",
)


@dataclass(frozen=True)
class CellConfig:
    """Everything that decides a cell's result, and nothing else: its id hashes this (less
    `row`, a label). Settings added later join the JSON only away from their defaults, so
    finished results keep their ids."""

    method: str
    row: str
    dataset: dict  # {"name": …, and the dataset's keywords}
    fold: int
    way: int
    shot: int
    protocol: str
    annotation: str = "mask"
    method_kwargs: dict = field(default_factory=dict)
    input_size: int = 0
    episodes: int = 0
    seeds: tuple[int, ...] = ()
    train: dict | None = None  # TrainConfig.to_dict(); None: the method does not train
    eval_precision: str = "fp32"
    sampler: str = "fsbench"
    checkpoint: dict | None = None  # released weights evaluated as they are (path, format, sha)
    # The protocol the cell is scored under when it is not the one it trains under (`protocol`):
    # its episodes, resizing and scoring (a grid's `eval_protocols`); "": `protocol`.
    eval_protocol: str = ""
    # The method class's `version` (its code version), when it declares one.
    method_version: str = ""
    # The model key of the trained model this cell's training starts from (`init_from`).
    init_from: str = ""
    evaluators: tuple[str, ...] = ()  # the grid's evaluators: what the record holds besides counts
    # The shot count of the model that scores the cell when not `shot` (`train_shot`: HSNet
    # tests its 1-shot model at 5 shots); 0: the cell's own model.
    train_shot: int = 0
    # The label resolution it is scored at when not its protocol's (a sensitivity copy).
    score_resolution: str = ""
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def dataset_name(self) -> str:
        return self.dataset["name"]

    @property
    def scored_under(self) -> str:
        """The protocol whose episodes, resizing and scoring gave the cell's numbers."""
        return self.eval_protocol or self.protocol

    @property
    def train_seed(self) -> int | None:
        """The training seed of a trained cell (None for methods that do not train)."""
        return (self.train or {}).get("seed")

    def to_json(self) -> dict:
        later = {} if self.eval_precision == "fp32" else {"eval_precision": self.eval_precision}
        if self.sampler != "fsbench":  # cells sampled before the official replay: fsbench's
            later["sampler"] = self.sampler
        for key in LATER_WHEN_SET:  # empty: absent, so finished cells keep their ids
            value = getattr(self, key)
            if value:
                later[key] = list(value) if isinstance(value, tuple) else value
        return {
            **later,
            "method": self.method,
            "method_kwargs": dict(sorted(self.method_kwargs.items())),
            "row": self.row,
            "dataset": dict(sorted(self.dataset.items())),
            "fold": self.fold,
            "way": self.way,
            "shot": self.shot,
            "annotation": self.annotation,
            "protocol": self.protocol,
            "input_size": self.input_size,
            "episodes": self.episodes,
            "seeds": list(self.seeds),
            "train": self.train,
            **self.extra,
        }

    def identity(self, version: bool = True) -> dict:
        """What a cell id hashes (the JSON less the row label); `version=False` also leaves out
        the method's code version (to find results of another version of the same cell)."""
        left_out = ("row",) if version else ("row", "method_version")
        return {k: v for k, v in self.to_json().items() if k not in left_out}

    @classmethod
    def from_json(cls, raw: dict) -> CellConfig:
        for key in CONFIG_KEYS:
            raw[key]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: raw[k] for k in known if k in raw}
        values["seeds"] = tuple(values.get("seeds") or ())
        values["evaluators"] = tuple(values.get("evaluators") or ())
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})
