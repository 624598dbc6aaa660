"""CANet (Zhang et al., CVPR 2019): dense comparison module + iterative optimization module.

The network of the official one_shot_network.py (icoz69/CaNet), layer for layer, so its
checkpoints load (`load_official_state_dict`) and give its logits (tests/test_parity.py):
- backbone: ResNet-50 conv1 … layer3 in the DeepLab layout, stride on each block's 1×1 conv,
  ceil-mode max pool, every layer3 block dilated 2 (output stride 8); BatchNorm frozen.
- embedding (`layer5`): layer2 ‖ layer3 → 3×3 conv, dilation 2, 256 + ReLU + Dropout2d(0.5);
  episode-independent, so the evaluator caches it.
- DCM: the support mask bilinearly downsampled to the features (align_corners=True) pools the
  support embedding (Σ m·f / (Σ m + 5e-4)); the vector is tiled over the query and `layer55`
  (3×3 conv, dilation 2, ReLU, Dropout2d) compares.
- IOM: out + res₁(out ‖ history), then two residual blocks; ASPP (global pooling branch, 1×1,
  3×3 dilated 6/12/18, each conv + ReLU + Dropout2d), 1×1 projection (+ ReLU + Dropout2d), 1×1
  classifier. `history` is the previous prediction's softmax (zeros at first), resized with
  align_corners=True.
Test time: a fixed number of IOM iterations (4); the official loop keeps, per epoch, the
iteration with the best test IoU, which reads test labels: fsbench does not.
k shots: the official repository has no k-shot code; this follows the paper (§3.3): each shot's
DCM output gets a weight from an attention branch (3×3 conv + ReLU + 1×1 conv to one channel,
global average pooled), softmax over shots, and the weighted sum enters the IOM.
Training (fsbench's loop): two unrolled IOM steps, the second fed the detached first
prediction; CANet feeds each image the prediction it got in the previous epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import combine_binary_heads
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import imagenet_weights_path, load_mapped_state_dict, read_state_dict

RESNET50_FILE = "resnet50-0676ba61.pth"
AREA_EPS = 5e-4  # one_shot_network.py: avg_pool(mask)·h·w + 0.0005


class Bottleneck(nn.Module):
    """The DeepLab ResNet bottleneck: stride on the 1×1 conv, dilation on the 3×3."""

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    """ResNet-50 up to layer3 (output stride 8), as one_shot_network.py builds it; its names
    are torchvision's, so ImageNet weights load by name."""

    def __init__(self, blocks=(3, 4, 6)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._layer(64, blocks[0])
        self.layer2 = self._layer(128, blocks[1], stride=2)
        self.layer3 = self._layer(256, blocks[2], dilation=2)

    def _layer(self, planes, blocks, stride=1, dilation=1):
        # Official rule: a projection whenever the stride, the width or the dilation changes.
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * 4),
        )
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layer2 = self.layer2(self.layer1(x))
        return torch.cat([layer2, self.layer3(layer2)], 1)


def conv_relu_dropout(in_channels, out_channels, kernel=3, dilation=1, dropout=0.5):
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation
        ),
        nn.ReLU(),
        nn.Dropout2d(dropout),
    )


def residual_block(in_channels, channels):
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


# official parameter name prefix → fsbench's (tensors match one to one below the prefix)
OFFICIAL_NAMES = {
    **{name: f"backbone.{name}" for name in ("conv1", "bn1", "layer1", "layer2", "layer3")},
    "layer5": "embed",
    "layer55": "compare",
    "residule1": "residuals.0",
    "residule2": "residuals.1",
    "residule3": "residuals.2",
    "layer6_0": "aspp_pool",
    **{f"layer6_{i}": f"aspp.{i - 1}" for i in range(1, 5)},
    "layer7": "project",
    "layer9": "classifier",
}


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
        init="official",
    ):
        super().__init__()
        self.backbone = Backbone(tuple(blocks))
        self.embed = conv_relu_dropout(512 + 1024, channels, 3, 2, dropout)
        self.compare = conv_relu_dropout(2 * channels, channels, 3, 2, dropout)
        self.residuals = nn.ModuleList(
            [residual_block(channels + 2, channels)]
            + [residual_block(channels, channels) for _ in range(2)]
        )
        self.aspp_pool = conv_relu_dropout(channels, channels, 1, dropout=dropout)
        self.aspp = nn.ModuleList(
            [conv_relu_dropout(channels, channels, 1, dropout=dropout)]
            + [conv_relu_dropout(channels, channels, 3, d, dropout) for d in (6, 12, 18)]
        )
        self.project = conv_relu_dropout(5 * channels, channels, 1, dropout=dropout)
        self.classifier = nn.Conv2d(channels, 2, 1)
        # the paper's k-shot attention (no official code): one weight per shot
        self.attention = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 1)
        )
        # The new layers as one_shot_network.py (N(0, 0.01) weights, torch's default biases),
        # or Xavier (`init: xavier`): a narrow head trained from scratch on small data stays at
        # the class prior under N(0, 0.01) (measured: 0 mIoU after 800 steps, 20 with Xavier).
        # The official backbone always starts from ImageNet; a random one (no `pretrained`)
        # keeps torchvision's ResNet initialisation, which trains.
        if init not in ("official", "xavier"):
            raise FsbenchError(f"CANet init {init!r} is not official or xavier")
        backbone = {id(m) for m in self.backbone.modules()}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in backbone:
                if init == "official":
                    module.weight.data.normal_(0, 0.01)
                else:
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()
        self.iterations = iterations
        if pretrained:
            self._load_resnet50(pretrained, blocks)
        # CANet fixes the ImageNet backbone; a randomly initialised one must learn.
        self.freeze_backbone = bool(pretrained) if freeze_backbone is None else freeze_backbone
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self.freeze_backbone)

    def _load_resnet50(self, pretrained, blocks) -> None:
        """torchvision's ResNet-50 tensors up to layer3, by name (as the official
        load_resnet50_param, which stops at layer4)."""
        path = imagenet_weights_path(RESNET50_FILE) if pretrained == "imagenet" else pretrained
        if tuple(blocks) != (3, 4, 6):
            raise FsbenchError("pretrained ResNet-50 weights need blocks=[3, 4, 6]")
        state = read_state_dict(
            path,
            "ResNet-50 file",
            f"put torchvision's {RESNET50_FILE} there or pass its path as `pretrained`",
        )
        wanted = self.backbone.state_dict()
        missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
        bad = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
        if missing or bad:
            raise FsbenchError(
                f"{path}: not a torchvision ResNet-50 state dict (missing {missing[:3]}, "
                f"mismatched {bad[:3]})"
            )
        self.backbone.load_state_dict({k: state.get(k, v) for k, v in wanted.items()})

    def load_official_state_dict(self, state_dict) -> None:
        """Weights saved from the official Res_Deeplab (`model.state_dict()`, with or without
        DataParallel's `module.`)."""
        load_mapped_state_dict(self, state_dict, OFFICIAL_NAMES, "CANet", optional=("attention.",))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:  # frozen BatchNorm statistics too
            self.backbone.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))

    @staticmethod
    def pool(support_features, support_fg):
        """[K, C] vectors: the mask downsampled to the features (align_corners=True) pools them."""
        mask = F.interpolate(
            support_fg[:, None], support_features.shape[-2:], mode="bilinear", align_corners=True
        )
        area = mask.sum((2, 3)) + AREA_EPS
        return (mask * support_features).sum((2, 3)) / area

    def comparison(self, support_features, support_fg, query_features):
        """DCM for one class [Q, C, h, w]; k shots fused by the attention weights."""
        vectors = self.pool(support_features, support_fg)
        maps = [
            self.compare(
                torch.cat([query_features, v[None, :, None, None].expand_as(query_features)], 1)
            )
            for v in vectors
        ]
        if len(maps) == 1:
            return maps[0]
        scores = torch.stack([self.attention(m).mean((1, 2, 3)) for m in maps], 0)  # [K, Q]
        weights = scores.softmax(0)
        return sum(w[:, None, None, None] * m for w, m in zip(weights, maps))

    def refine(self, compared, history):
        """One IOM pass: logits [Q, 2, h, w] from the DCM output and the last prediction."""
        history = F.interpolate(history, compared.shape[-2:], mode="bilinear", align_corners=True)
        out = compared + self.residuals[0](torch.cat([compared, history], 1))
        out = out + self.residuals[1](out)
        out = out + self.residuals[2](out)
        pooled = self.aspp_pool(out.mean((2, 3), keepdim=True)).expand_as(out)
        out = self.project(torch.cat([pooled] + [branch(out) for branch in self.aspp], 1))
        return self.classifier(out)

    def binary_logits(self, support_features, support_fg, query_features, iterations):
        """Every IOM pass's logits; pass i + 1 sees the softmax of pass i."""
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
        # train.py's test loop upsamples with align_corners=True
        return F.interpolate(low, size=out_size, mode="bilinear", align_corners=True)

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


@METHODS.register(display="CANet")
def canet(blocks=(3, 4, 6), **kwargs) -> CANet:
    """CANet with a dilated ResNet-50 (ImageNet weights from a local torchvision file); keywords
    as `CANet`: channels, iterations, pretrained, freeze_backbone, dropout, init."""
    return CANet(tuple(blocks), **kwargs)
