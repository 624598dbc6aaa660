"""Fine-tuning baselines.

- `linear_probe`: a linear classifier on frozen (ImageNet) encoder features, fitted on each
  episode's support set at test time, then applied to the query. Nothing is trained on the base
  classes: it measures the features, not a segmentation network.
- `finetune`: OSLSM's fine-tuning baseline (Shaban et al., BMVC 2017, §5): a segmentation
  network (PANet's VGG-16 encoder and a 1×1 foreground/background classifier) trained on the
  base classes, then, for each episode, its classifier fine-tuned on the support set (SGD on the
  support pixels, encoder fixed) before it predicts the query. N-way: one fine-tuned binary head
  per class, combined (background = every head says background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import VGG16Encoder, combine_binary_heads
from fsbench.methods.registry import METHODS


def support_labels(support_fg, support_bg):
    """[N, K, H, W] long: 0 background, i + 1 for way i's foreground, 255 elsewhere."""
    labels = torch.full(support_fg.shape, 255, dtype=torch.long, device=support_fg.device)
    for index in range(support_fg.shape[0]):
        labels[index][support_bg[index] > 0] = 0
        labels[index][support_fg[index] > 0] = index + 1
    return labels


def fit_classifier(features, labels, weight, bias, steps, make_optimizer):
    """Fit a 1×1 classifier (weight [O, C], bias [O]) on features [B, C, h, w] against labels
    [B, H, W] (bilinear upsampling of the logits, 255 ignored): full-batch, deterministic."""
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    optimizer = make_optimizer([weight, bias])
    features = features.detach()
    with torch.enable_grad():
        for _ in range(steps):
            logits = F.conv2d(features, weight[:, :, None, None], bias)
            logits = F.interpolate(
                logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, labels, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weight.detach(), bias.detach()


class LinearProbe(FewShotMethod):
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
        way = support_fg.shape[0]
        features = support_features.flatten(0, 1)
        zeros = features.new_zeros(way + 1, features.shape[1])
        return fit_classifier(
            features,
            support_labels(support_fg, support_bg).flatten(0, 1),
            zeros,
            zeros[:, 0],
            self.steps,
            lambda params: torch.optim.Adam(params, lr=self.lr),
        )

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        weight, bias = self.fit(support_features, support_fg, support_bg)
        logits = F.conv2d(query_features, weight[:, :, None, None], bias)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


class Finetune(FewShotMethod):
    """OSLSM's baseline: train a binary segmentation network on the base classes, fine-tune its
    classifier on each episode's supports, predict the query."""

    cacheable_encoder = True  # the encoder is fixed while fine-tuning

    def __init__(self, width=1.0, pretrained=None, steps=50, lr=0.01, momentum=0.9):
        super().__init__()
        self.encoder = VGG16Encoder(width=width, pretrained=pretrained)
        self.classifier = nn.Conv2d(self.encoder.out_channels, 2, 1)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        self.steps, self.lr, self.momentum = steps, lr, momentum

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        """Base-class training: the query's episode classes are foreground (supports unused)."""
        features = self.encode(episode.query_images)
        logits = F.interpolate(
            self.classifier(features),
            size=episode.query_labels.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        labels = episode.query_labels.clamp(max=1).masked_fill(episode.query_labels == 255, 255)
        segmentation = F.cross_entropy(logits, labels, ignore_index=255)
        return {"segmentation": segmentation, "total": segmentation}

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        weight = self.classifier.weight[:, :, 0, 0]
        heads = []
        for index in range(support_fg.shape[0]):  # one binary head per class
            labels = support_labels(support_fg[index : index + 1], support_bg[index : index + 1])
            tuned = fit_classifier(
                support_features[index],
                labels[0].clamp(max=1).masked_fill(labels[0] == 255, 255),
                weight,
                self.classifier.bias,
                self.steps,
                lambda params: torch.optim.SGD(params, lr=self.lr, momentum=self.momentum),
            )
            heads.append(F.conv2d(query_features, tuned[0][:, :, None, None], tuned[1]))
        low = combine_binary_heads(heads)
        return F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)


# `finetune_linear` was its name: finished results under it still rebuild and print as it.
@METHODS.register(display="Linear probe", aliases=["finetune_linear"])
def linear_probe(width=1.0, pretrained=None, steps=100, lr=0.1) -> LinearProbe:
    """Linear classifier fitted on the support set of each episode (frozen VGG-16 encoder)."""
    return LinearProbe(width=width, pretrained=pretrained, steps=steps, lr=lr)


@METHODS.register(display="Fine-tuning (OSLSM)")
def finetune(width=1.0, pretrained=None, steps=50, lr=0.01, momentum=0.9) -> Finetune:
    """OSLSM's fine-tuning baseline: trained on the base classes, fine-tuned on the supports."""
    return Finetune(width=width, pretrained=pretrained, steps=steps, lr=lr, momentum=momentum)
