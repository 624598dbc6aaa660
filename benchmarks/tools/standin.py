"""A method standing in for GPU work, for the cluster-scale benchmark (tools/scale.py): a plugin
module a grid imports (`imports: [fsbench.benchmarks.tools.standin]`), run by fsbench's real
training and evaluation tasks.

Training sleeps `step_seconds` per step and evaluation `image_seconds` per encoded image, each
scaled by a log-normal factor drawn from a generator seeded by the variant (so a sweep over
`variant` gives cells of seeded, unequal durations); each step and each encoding holds
`memory_mb` of memory for its duration. It predicts background everywhere.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fsbench.methods.base import FewShotMethod
from fsbench.methods.registry import METHODS

SEED = 2026


def durations(variant: int, step_seconds: float, image_seconds: float, spread: float):
    """(seconds per training step, seconds per encoded image) of a variant: seeded draws."""
    rng = np.random.default_rng([SEED, int(variant)])
    train, evaluate = rng.lognormal(0.0, spread, 2)
    return float(step_seconds * train), float(image_seconds * evaluate)


class StandIn(FewShotMethod):
    trainable = True
    cacheable_encoder = True  # each distinct image is encoded (slept on) once per model

    def __init__(self, variant=0, step_seconds=1.0, image_seconds=0.05, spread=0.3, memory_mb=8):
        super().__init__()
        self.step_seconds, self.image_seconds = durations(
            variant, step_seconds, image_seconds, spread
        )
        self.memory = int(memory_mb) << 20
        self.weight = nn.Parameter(torch.zeros(1))

    def _busy(self, seconds: float) -> None:
        block = bytearray(self.memory)  # the "activations" of the step
        time.sleep(seconds)
        del block

    def loss(self, episode):
        self._busy(self.step_seconds)
        total = (self.weight**2).sum() + 1.0
        return {"total": total}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._busy(self.image_seconds * len(images))
        return torch.zeros(len(images), 1, 1, 1)

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        way = support_fg.shape[0]
        logits = torch.zeros(len(query_features), 1 + way, *out_size)
        logits[:, 0] = 1.0  # background everywhere
        return logits


@METHODS.register()
def standin(**kwargs) -> StandIn:
    return StandIn(**kwargs)
