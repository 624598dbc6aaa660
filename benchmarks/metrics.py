"""Segmentation metrics over episodes: summed TP/FP/FN counts, the metric registry (mIoU, FB-IoU,
and any registered later), bootstrap CIs.

Every metric is a function of the counts summed over a set of episodes — per class, background,
foreground — so one definition gives the value, its per-seed and per-class forms and, applied to
bootstrap-weighted sums, its intervals. Records, MLflow, tables and figures list `METRICS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fsbench.core import FsbenchError, Registry


def confusion(pred, label, way: int) -> np.ndarray:
    """[(1+way), (1+way)] pixel counts, rows = label, columns = prediction; label 255 excluded."""
    pred = np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred).astype(np.int64).ravel()
    label = np.asarray(label.cpu() if hasattr(label, "cpu") else label).astype(np.int64).ravel()
    valid = label != 255
    n = way + 1
    flat = label[valid] * n + pred[valid]
    return np.bincount(flat, minlength=n * n).reshape(n, n)


def batched_confusion(pred, label, way: int) -> np.ndarray:
    """[M, 1+way, 1+way] confusion matrices of M predictions and labels [M, H, W] in one
    `bincount` (on the tensors' device); label 255 excluded."""
    import torch

    n = way + 1
    index = torch.arange(label.shape[0], device=label.device).view(-1, *[1] * (label.dim() - 1))
    # Void (255) becomes an extra label row that is dropped: no boolean gather over the pixels.
    rows = torch.where(label == 255, n, label)
    counts = torch.bincount(
        ((index * (n + 1) + rows) * n + pred).flatten(), minlength=label.shape[0] * (n + 1) * n
    )
    return counts.view(-1, n + 1, n)[:, :n].cpu().numpy()


def record_counts(matrix: np.ndarray, only_present: bool):
    """Per episode index (0 = background): (tp, fp, fn) rows, the foreground row, presence flags.

    With `only_present` (PANet's util/metric.py), a class contributes nothing to a record whose
    label lacks it, and foreground = the sum of the class rows; otherwise foreground is the binary
    "any episode class" split.
    """
    tp = np.diag(matrix)
    rows = np.stack([tp, matrix.sum(0) - tp, matrix.sum(1) - tp], axis=1)  # [(1+way), 3]
    present = matrix.sum(1) > 0
    if only_present:
        rows = rows * present[:, None]
        foreground = rows[1:].sum(0)
    else:
        foreground = np.array([matrix[1:, 1:].sum(), matrix[0, 1:].sum(), matrix[1:, 0].sum()])
    return rows, foreground


def iou(counts: np.ndarray) -> np.ndarray:
    """IoU from [..., 3] (tp, fp, fn) counts; NaN where a class has no pixels at all."""
    counts = np.asarray(counts, dtype=np.float64)
    denominator = counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, counts[..., 0] / denominator, np.nan)


def miou_from(class_counts: np.ndarray) -> np.ndarray:
    """Mean IoU over classes of summed counts [..., C, 3] (classes never seen are left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN, as they should
        return np.nanmean(iou(class_counts), axis=-1)


def fb_iou_from(bg_counts: np.ndarray, fg_counts: np.ndarray) -> np.ndarray:
    return (iou(bg_counts) + iou(fg_counts)) / 2


@dataclass(frozen=True)
class Metric:
    """A metric computed from summed counts: `from_sums(per_class [..., C, 3], background
    [..., 3], foreground [..., 3])` → values [...] in [0, 1] (leading axes: bootstrap draws)."""

    name: str  # its key in cell records, result frames and MLflow (`miou`, `seed/<s>/miou`)
    label: str  # as tables, captions and figure axes print it
    from_sums: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {}  # in registration order: the order of tables and columns
# Evaluators a grid names (`evaluators: [...]`): builders of evaluation.evaluator.Evaluator
# subclasses, taking `output_kind`; each is fed every batch of queries on every evaluation path
# and its `result()` (JSON) is kept with each seed's record. Here, below the grid layer, so a
# grid's names are checked when it is read.
EVALUATORS = Registry("evaluator")


def register_metric(name: str, label: str, higher_is_better: bool = True):
    """Register `from_sums` as a metric; it then appears in records, MLflow, tables, figures."""

    def decorator(from_sums):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice; rename one of them")
        METRICS[name] = Metric(name, label, from_sums, higher_is_better)
        return from_sums

    return decorator


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise FsbenchError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


@register_metric("miou", "mIoU")
def _miou(per_class, background, foreground):
    """Mean over the fold's classes of IoU from counts summed over the episodes (PANet's)."""
    return miou_from(per_class)


@register_metric("fb_iou", "FB-IoU")
def _fb_iou(per_class, background, foreground):
    """Mean of background and foreground IoU (OSLSM's, CANet's FB-IoU)."""
    return fb_iou_from(background, foreground)


@dataclass
class EpisodeCounts:
    """Per-episode counts of one evaluation: the data behind every metric and interval."""

    classes: list[int]  # the fold's classes (dataset ids), the columns of `per_class`
    per_class: np.ndarray  # [E, C, 3]
    background: np.ndarray  # [E, 3]
    foreground: np.ndarray  # [E, 3]

    def sums(self, weights: np.ndarray | None = None):
        """(per class, background, foreground) summed over the episodes, or [B, ...] sums under
        B rows of episode weights (bootstrap multiplicities)."""
        if weights is None:
            return self.per_class.sum(0), self.background.sum(0), self.foreground.sum(0)
        return (
            np.einsum("be,eck->bck", weights, self.per_class),
            weights @ self.background,
            weights @ self.foreground,
        )

    def value(self, metric: str, weights: np.ndarray | None = None):
        """A registered metric of these episodes (an array of B values under `weights`)."""
        values = get_metric(metric).from_sums(*self.sums(weights))
        return float(values) if weights is None else values

    def miou(self) -> float:
        return self.value("miou")

    def class_iou(self) -> dict[int, float]:
        return dict(zip(self.classes, iou(self.per_class.sum(0)).tolist()))

    def fb_iou(self) -> float:
        return self.value("fb_iou")

    def to_json(self) -> dict:
        """Per-class counts stored sparsely: [episode, class index, tp, fp, fn] for the rows that
        are not all zero (an episode's own classes), not [E × fold classes × 3] (720k integers
        per seed for FSS-1000's 240 test classes and 2400 episodes)."""
        episode, column = np.nonzero(self.per_class.sum(-1))
        rows = np.column_stack([episode, column, self.per_class[episode, column]])
        return {
            "classes": self.classes,
            "episodes": int(self.per_class.shape[0]),
            "per_class_sparse": rows.tolist(),
            "background": self.background.tolist(),
            "foreground": self.foreground.tolist(),
        }

    @classmethod
    def from_json(cls, raw: dict) -> EpisodeCounts:
        classes = list(raw["classes"])
        if "per_class_sparse" in raw:
            per_class = np.zeros((raw["episodes"], len(classes), 3), dtype=np.int64)
            rows = np.asarray(raw["per_class_sparse"], dtype=np.int64).reshape(-1, 5)
            per_class[rows[:, 0], rows[:, 1]] = rows[:, 2:]
        else:  # records written before the sparse form
            per_class = np.asarray(raw["per_class"], dtype=np.int64).reshape(-1, len(classes), 3)
        return cls(
            classes,
            per_class,
            np.asarray(raw["background"], dtype=np.int64).reshape(-1, 3),
            np.asarray(raw["foreground"], dtype=np.int64).reshape(-1, 3),
        )


class SegmentationMeter:
    """Accumulates per-query predictions of one seed's episodes into per-episode counts."""

    def __init__(self, classes, only_present: bool = False):
        self.classes = [int(c) for c in classes]
        self.only_present = only_present
        self._column = {c: i for i, c in enumerate(self.classes)}
        self._episodes: dict[int, list[np.ndarray]] = {}

    def update(self, pred, label, episode_class_ids, episode: int | None = None) -> None:
        """Add one query: pred and label [H, W] in episode indices (0 bg, i = i-th class, 255)."""
        matrix = confusion(pred, label, len(episode_class_ids))
        self.add_confusion(matrix, episode_class_ids, episode)

    def add_confusion(self, matrix, episode_class_ids, episode: int | None = None) -> None:
        """Add one query's [(1+way), (1+way)] confusion matrix (rows label, columns prediction)."""
        rows, foreground = record_counts(matrix, self.only_present)
        per_class = np.zeros((len(self.classes), 3), dtype=np.int64)
        for index, class_id in enumerate(episode_class_ids, start=1):
            if int(class_id) not in self._column:
                raise ValueError(
                    f"class {class_id} is not one of the meter's classes {self.classes}"
                )
            per_class[self._column[int(class_id)]] += rows[index]
        key = len(self._episodes) if episode is None else int(episode)
        record = [per_class, rows[0].astype(np.int64), foreground.astype(np.int64)]
        if key in self._episodes:
            self._episodes[key] = [a + b for a, b in zip(self._episodes[key], record)]
        else:
            self._episodes[key] = record

    def counts(self) -> EpisodeCounts:
        keys = sorted(self._episodes)
        if not keys:
            empty = np.zeros((0, 3), np.int64)
            return EpisodeCounts(
                self.classes, np.zeros((0, len(self.classes), 3), np.int64), empty, empty
            )
        return EpisodeCounts(
            self.classes, *(np.stack([self._episodes[k][i] for k in keys]) for i in range(3))
        )

    def class_iou(self) -> dict[int, float]:
        return self.counts().class_iou()

    def miou(self) -> float:
        return self.counts().miou()

    def fb_iou(self) -> float:
        return self.counts().fb_iou()


def _resample_weights(n_episodes: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, E] multiplicities of a bootstrap resampling of E episodes (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_episodes, np.full(n_episodes, 1.0 / n_episodes), size=n_boot)


def _boot_stat(counts: EpisodeCounts, weights: np.ndarray, metric: str) -> np.ndarray:
    return counts.value(metric, weights)


def bootstrap_ci(counts: EpisodeCounts, metric="miou", n_boot=1000, level=0.95, seed=0):
    """Percentile CI of a summed-ratio metric, resampling episodes."""
    weights = _resample_weights(len(counts.per_class), n_boot, seed)
    samples = _boot_stat(counts, weights, metric)
    tail = (1 - level) / 2 * 100
    return float(np.nanpercentile(samples, tail)), float(np.nanpercentile(samples, 100 - tail))


def paired_bootstrap(
    a: EpisodeCounts, b: EpisodeCounts, metric="miou", n_boot=1000, level=0.95, seed=0
) -> dict:
    """CI of metric(a) − metric(b) on the same episodes (same resampling applied to both)."""
    if a.per_class.shape != b.per_class.shape or a.classes != b.classes:
        raise ValueError("paired bootstrap needs counts from the same manifest (same episodes)")
    weights = _resample_weights(len(a.per_class), n_boot, seed)
    diff = _boot_stat(a, weights, metric) - _boot_stat(b, weights, metric)
    tail = (1 - level) / 2 * 100
    low, high = float(np.nanpercentile(diff, tail)), float(np.nanpercentile(diff, 100 - tail))
    observed = a.value(metric) - b.value(metric)
    return {"difference": observed, "low": low, "high": high, "significant": not low <= 0 <= high}
