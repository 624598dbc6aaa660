"""Evaluators: what consumes a method's outputs on one manifest, in detectron2's
`DatasetEvaluator` shape — `reset()`, `process(outputs, labels, refs)` per batch of queries (in
any order), `result()`. `EpisodeCounter` is the engine's own: per-episode TP/FP/FN counts at the
protocol's scoring resolution, plus the kept predictions. A plugin that needs more than summed
counts subclasses `Evaluator`, registers it (`fsbench.register_evaluator`) and is named in a grid
(`evaluators: [name]`): it is then fed the same calls on every evaluation path, and its
`result()` is kept with each seed's record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import torch

from fsbench.benchmarks.metrics import EVALUATORS, SegmentationMeter, batched_confusion
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader, EpisodeSpec, label_of
from fsbench.methods.base import labels_of, resize_output


class QueryRef(NamedTuple):
    """Which query a row of a batch is: the episode's index in the manifest, its spec, and the
    query's index in the episode."""

    episode: int
    spec: EpisodeSpec
    query: int


class Evaluator(ABC):
    """The interface: `reset()` before a manifest, `process(outputs, labels, refs)` for each
    batch of M queries — the method's outputs [M, 1+N, S, S] (logits) or [M, S, S] (labels, as
    `output_kind` says), labels [M, S, S] at the input size (0 background, i the i-th class,
    255 void), refs [QueryRef] — then `result()`."""

    def __init__(self, output_kind: str = "logits"):
        self.output_kind = output_kind

    def reset(self) -> None:  # noqa: B027 - optional: stateless evaluators need no reset
        """Forget what was processed (before a manifest)."""

    @abstractmethod
    def process(self, outputs: torch.Tensor, labels: torch.Tensor, refs: list[QueryRef]):
        """Consume one batch of queries' outputs."""

    def result(self):
        return None


def build_evaluators(names, output_kind: str) -> list[Evaluator]:
    """The grid's named evaluators, fresh, for one manifest."""
    built = []
    for name in names:
        evaluator = EVALUATORS.get(name)(output_kind=output_kind)
        if not isinstance(evaluator, Evaluator):
            raise FsbenchError(
                f"evaluator {name!r} built a {type(evaluator).__name__}, not an Evaluator; "
                "subclass fsbench.benchmarks.evaluation.evaluator.Evaluator"
            )
        built.append(evaluator)
    return built


def scoring_label(dataset, image_id, classes) -> torch.Tensor:
    """The query's label at original resolution, in episode indices (protocols scoring there)."""
    masks, void = dataset.load_masks(image_id, list(classes))
    return label_of(torch.from_numpy(np.stack(masks)), torch.from_numpy(void))


class EpisodeCounter(Evaluator):
    """Per-episode counts of one manifest (integers keyed by episode, so the order of
    processing never changes them) at the protocol's scoring resolution, and the first query's
    prediction of the first `keep_predictions` episodes."""

    def __init__(
        self,
        loader: EpisodeLoader,
        manifest,
        protocol,
        keep_predictions: int = 0,
        output_kind: str = "logits",
    ):
        super().__init__(output_kind)
        self.loader, self.manifest, self.protocol = loader, manifest, protocol
        self.keep = keep_predictions
        self.reset()

    def reset(self) -> None:
        self.meter = SegmentationMeter(
            self.loader.dataset.classes_at(self.manifest.spec["fold"], self.manifest.spec["shot"]),
            only_present=self.protocol.only_present_classes,
        )
        self.kept: dict[int, torch.Tensor] = {}

    def process(self, outputs, labels, refs) -> None:
        if self.protocol.score_resolution == "original":
            predictions = [
                self._score_original(outputs[row : row + 1], ref) for row, ref in enumerate(refs)
            ]
        else:
            predictions = labels_of(outputs, self.output_kind)  # [M, S, S]
            way = len(refs[0].spec.classes) if refs else 1
            for matrix, ref in zip(batched_confusion(predictions, labels, way), refs):
                self.meter.add_confusion(matrix, ref.spec.classes, ref.episode)
        for prediction, ref in zip(predictions, refs):
            if ref.episode < self.keep and ref.query == 0:
                self.kept[ref.episode] = prediction.cpu()

    def _score_original(self, output, ref: QueryRef) -> torch.Tensor:
        label = scoring_label(self.loader.dataset, ref.spec.query[ref.query], ref.spec.classes)
        label = label.to(output.device)
        if self.loader.resize == "keep_ratio_pad":
            # PFENet's test.py (ori_resize): the whole input's output, bilinear with
            # align_corners=True, onto the longer side's square, against the label padded there
            # with 255 (so the padded part is never scored).
            longer = max(label.shape)
            output = resize_output(output, (longer, longer), self.output_kind, True)
            output = output[..., : label.shape[0], : label.shape[1]]
        else:
            output = resize_output(output, tuple(label.shape), self.output_kind, False)
        prediction = labels_of(output, self.output_kind)[0]
        self.meter.update(prediction, label, ref.spec.classes, ref.episode)
        return prediction

    def result(self):
        kept = [{"episode": e, "prediction": self.kept[e]} for e in sorted(self.kept)]
        return self.meter.counts(), kept
