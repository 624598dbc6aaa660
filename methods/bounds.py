"""Trivial bounds every table should show: predict background everywhere, or the first class."""

from __future__ import annotations

import torch

from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.registry import METHODS


class ConstantPrediction(FewShotMethod):
    """Logits that put every query pixel in one episode index (0 = background, 1 = first class)."""

    trainable = False

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, episode: Episode) -> torch.Tensor:
        queries, (height, width) = episode.query_images.shape[0], episode.query_labels.shape[-2:]
        logits = episode.query_images.new_zeros(queries, episode.way + 1, height, width)
        logits[:, self.index] = 1.0
        return logits


@METHODS.register(display="All background")
def all_background() -> ConstantPrediction:
    """Lower bound: no pixel is foreground (mIoU 0, FB-IoU ≈ background share / 2)."""
    return ConstantPrediction(0)


@METHODS.register(display="All foreground")
def all_foreground() -> ConstantPrediction:
    """Every pixel is the first episode class (the upper end of recall, the floor of precision)."""
    return ConstantPrediction(1)
