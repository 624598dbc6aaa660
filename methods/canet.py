"""CANet (Zhang et al., CVPR 2019): dense comparison module + iterative optimization module.

Embedding: dilated ResNet-50 layer2 and layer3 (output stride 8), concatenated, 3×3 conv
(dilation 2) to 256 + dropout: episode-independent, so the evaluator caches it. DCM: the support
embedding is masked-average pooled, tiled over the query and compared by a 3×3 conv. IOM: the
comparison features and the previous prediction (2 channels, zeros at first) pass three residual
blocks and ASPP to 2-class logits, iterated 4 times at test. k shots: per-shot comparison maps
fused by softmax attention weights. Dropout2d (0.5, as the paper) follows the embedding, the
comparison and the IOM input. Training unrolls two IOM steps (the second takes the detached
first prediction); CANet itself feeds each image's prediction from the previous epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.datasets.episodes import Episode
from fsbench.datasets.registry import FsbenchError
from fsbench.methods.layers import (
    FewShotMethod,
    combine_binary_heads,
    imagenet_weights_path,
    masked_average_pool,
)
from fsbench.methods.registry import METHODS

RESNET50_FILE = "resnet50-0676ba61.pth"


def conv(in_channels, out_channels, kernel=3, dilation=1):
    return nn.Conv2d(
        in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation
    )


class ASPP(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = conv(channels, channels, 1)
        self.branches = nn.ModuleList(
            [conv(channels, channels, 1)] + [conv(channels, channels, 3, d) for d in (6, 12, 18)]
        )
        self.project = nn.Sequential(conv(5 * channels, channels, 1), nn.ReLU(inplace=True))

    def forward(self, x):
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], 1))


class CANet(FewShotMethod):
    cacheable_encoder = True

    def __init__(
        self,
        blocks=(3, 4, 6),
        channels=256,
        iterations=4,
        pretrained=None,
        freeze_backbone=None,
        dropout=0.5,
    ):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        backbone = ResNet(
            Bottleneck, [*blocks, 1], replace_stride_with_dilation=[False, True, True]
        )
        if pretrained:
            path = imagenet_weights_path(RESNET50_FILE) if pretrained == "imagenet" else pretrained
            if tuple(blocks) != (3, 4, 6):
                raise FsbenchError("pretrained ResNet-50 weights need blocks=[3, 4, 6]")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                backbone.load_state_dict(state)
            except FileNotFoundError:
                raise FsbenchError(
                    f"{path}: ResNet-50 file not found; put torchvision's "
                    f"{RESNET50_FILE} there or pass its path as `pretrained`"
                ) from None
            except RuntimeError as error:
                raise FsbenchError(
                    f"{path}: not a torchvision ResNet-50 state dict ({error})"
                ) from None
        self.stem = nn.Sequential(
            backbone.conv1,
            backbone.bn1,
            backbone.relu,
            backbone.maxpool,
            backbone.layer1,
            backbone.layer2,
        )
        self.layer3 = backbone.layer3
        # CANet fixes the ImageNet backbone; a randomly initialised one must learn.
        self.freeze_backbone = bool(pretrained) if freeze_backbone is None else freeze_backbone
        for parameter in (*self.stem.parameters(), *self.layer3.parameters()):
            parameter.requires_grad_(not self.freeze_backbone)
        self.embed = nn.Sequential(
            conv(512 + 1024, channels, 3, 2), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.compare = nn.Sequential(
            conv(2 * channels, channels, 3, 2), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.attention = nn.Sequential(
            conv(channels, channels, 3), nn.ReLU(inplace=True), conv(channels, 1, 1)
        )
        self.merge = nn.Sequential(
            conv(channels + 2, channels, 3), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.residuals = nn.ModuleList(
            nn.Sequential(nn.ReLU(), conv(channels, channels), nn.ReLU(), conv(channels, channels))
            for _ in range(3)
        )
        self.aspp = ASPP(channels)
        self.classifier = conv(channels, 2, 1)
        self.iterations = iterations

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:  # frozen BatchNorm statistics too
            self.stem.eval()
            self.layer3.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        layer2 = self.stem(images)
        return self.embed(torch.cat([layer2, self.layer3(layer2)], 1))

    def comparison(self, support_features, support_fg, query_features):
        """DCM for one class: per-shot comparison maps fused by softmax attention over shots."""
        prototypes = masked_average_pool(support_features, support_fg)  # [K, C]
        maps = [
            self.compare(
                torch.cat([query_features, p[None, :, None, None].expand_as(query_features)], 1)
            )
            for p in prototypes
        ]
        if len(maps) == 1:
            return maps[0]
        scores = torch.stack([self.attention(m).mean((1, 2, 3)) for m in maps], 0)  # [K, Q]
        weights = scores.softmax(0)
        return sum(w[:, None, None, None] * m for w, m in zip(weights, maps))

    def refine(self, compared, history):
        """One IOM step: logits [Q, 2, h, w] from comparison features and the last prediction."""
        x = self.merge(torch.cat([compared, history], 1))
        for block in self.residuals:
            x = x + block(x)
        return self.classifier(self.aspp(x))

    def binary_logits(self, support_features, support_fg, query_features, iterations):
        compared = self.comparison(support_features, support_fg, query_features)
        history = compared.new_zeros(compared.shape[0], 2, *compared.shape[2:])
        outputs = []
        for _ in range(iterations):
            logits = self.refine(compared, history)
            outputs.append(logits)
            history = logits.softmax(1).detach() if self.training else logits.softmax(1)
        return outputs

    def predict(
        self, support_features, support_fg, support_bg, query_features, out_size, iterations=None
    ):
        way = support_fg.shape[0]
        steps = iterations or self.iterations
        heads = [
            self.binary_logits(support_features[i], support_fg[i], query_features, steps)[-1]
            for i in range(way)
        ]
        low = combine_binary_heads(heads)
        return F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        support, query = self.encode_episode(episode)
        logits = self.predict(
            support,
            episode.support_fg,
            episode.support_bg,
            query,
            episode.query_labels.shape[-2:],
            iterations=2,
        )
        segmentation = F.cross_entropy(logits, episode.query_labels, ignore_index=255)
        return {"segmentation": segmentation, "total": segmentation}


@METHODS.register()
def canet(
    blocks=(3, 4, 6), channels=256, iterations=4, pretrained=None, freeze_backbone=None, dropout=0.5
):
    """CANet with a dilated ResNet-50 (ImageNet weights from a local torchvision file)."""
    return CANet(tuple(blocks), channels, iterations, pretrained, freeze_backbone, dropout)


@METHODS.register()
def test_canet(**kwargs):
    return canet(**{"blocks": (1, 1, 1), "channels": 16, "iterations": 2, **kwargs})
