"""Fine-tuning baseline (as in OSLSM's comparison): a linear classifier on frozen encoder
features, fitted on each episode's support set at test time, then applied to the query."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsbench.methods.layers import FewShotMethod, VGG16Encoder
from fsbench.methods.registry import METHODS


class FinetuneLinear(FewShotMethod):
    """A 1×1 conv (1+N outputs) over L2-normalised frozen features, fitted with Adam per episode.

    Deterministic: zero initialisation and full-batch steps over all support pixels."""

    trainable = False
    cacheable_encoder = True

    def __init__(self, width=1.0, pretrained=None, steps=100, lr=0.1):
        super().__init__()
        self.encoder = VGG16Encoder(width=width, pretrained=pretrained)
        self.steps, self.lr = steps, lr

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(images), dim=1)

    def fit(self, support_features, support_fg, support_bg):
        """The classifier's weight [1+N, C] and bias [1+N] fitted on the supports."""
        way, shot = support_fg.shape[:2]
        features = support_features.flatten(0, 1)
        labels = torch.full(support_fg.shape, 255, dtype=torch.long, device=support_fg.device)
        for index in range(way):
            labels[index][support_bg[index] > 0] = 0
            labels[index][support_fg[index] > 0] = index + 1
        labels = labels.flatten(0, 1)
        weight = features.new_zeros(way + 1, features.shape[1], requires_grad=True)
        bias = features.new_zeros(way + 1, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = F.conv2d(features.detach(), weight[:, :, None, None], bias)
                logits = F.interpolate(
                    logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
                )
                loss = F.cross_entropy(logits, labels, ignore_index=255)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return weight.detach(), bias.detach()

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        weight, bias = self.fit(support_features, support_fg, support_bg)
        logits = F.conv2d(query_features, weight[:, :, None, None], bias)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


@METHODS.register()
def finetune_linear(width=1.0, pretrained=None, steps=100, lr=0.1):
    """Linear classifier fitted on the support set of each episode (frozen VGG-16 encoder)."""
    return FinetuneLinear(width=width, pretrained=pretrained, steps=steps, lr=lr)


@METHODS.register()
def test_finetune_linear(**kwargs):
    return finetune_linear(**{"width": 1 / 16, "steps": 5, **kwargs})
