"""HSNet (Min et al., ICCV 2021): hypercorrelation squeeze network.

The network of juhongm999/hsnet `HypercorrSqueezeNetwork`, with its parameter names, so its
released checkpoints load (`load_official_state_dict`) and give its outputs
(tests/test_parity.py, fixtures recorded from the official code):
- backbone: torchvision's ResNet-50 / ResNet-101 / VGG-16, frozen and always in eval mode; the
  features are every bottleneck's output of layers 2–4 *before* its last ReLU (ResNet), or
  conv4_1…conv5_3 before their ReLU plus pool5 (VGG), as `extract_feat_res` / `_vgg`.
- support features masked per layer (the mask resized bilinearly, align_corners=True);
- correlation: cosine of every query and support position (norms + 1e-5), clamped at 0, stacked
  per backbone stage → three 4D tensors [B, L, hq, wq, hs, ws];
- learner: centre-pivot 4D convolutions (a 2D conv over the query dims of the support-strided
  tensor plus a 2D conv over the support dims), GroupNorm(4), ReLU; squeeze, mix 4→3→2 with the
  support dims resized bilinearly (align_corners=True); mean over the support dims; decoder
  (two conv pairs around a ×2 bilinear upsampling).
- 1-shot: the logits upsampled to the output size (align_corners=True), argmax. k-shot: the
  official `predict_mask_nshot` — the k 1-shot argmaxes summed, divided by the largest vote
  (at least 1), ≥ 0.5 → foreground. HSNet outputs labels, scored as labels.
N-way (no official code; HSNet is 1-way): each class's normalised vote as above; a pixel goes
to the class with the largest one when it reaches 0.5 (ties: the first class), else background.
Training: cross-entropy of the 1-shot logits at the input size against the query mask, where
HSNet's loader makes ignore (255) pixels background; a k-shot episode trains as the
1-shot episode of its first support (the official trains 1-shot only and tests k-shot).
"""

from __future__ import annotations

from functools import reduce
from operator import add

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import imagenet_weights_path, load_mapped_state_dict, read_state_dict

# torchvision's ImageNet files (the `pretrained=True` weights the official code downloads)
WEIGHT_FILES = {
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "vgg16": "vgg16-397923af.pth",
}
# bottlenecks per stage (VGG: convs per block + pool5), as the official `nbottlenecks`
BOTTLENECKS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3], "vgg16": [2, 2, 3, 3, 3, 1]}
VGG_FEATURES = (17, 19, 21, 24, 26, 28, 30)  # torchvision vgg16.features indices
CORRELATION_EPS = 1e-5


class CenterPivotConv4d(nn.Module):
    """A 4D convolution over [B, C, hq, wq, hs, ws] as the sum of two 2D ones: `conv1` over
    the query dims of the support-strided tensor, `conv2` over the support dims (strided)."""

    def __init__(self, in_channels, out_channels, kernel, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2)
        self.stride = stride

    def forward(self, x):
        b, c, hq, wq, hs, ws = x.shape
        pruned = x[..., :: self.stride, :: self.stride] if self.stride > 1 else x
        ph, pw = pruned.shape[-2:]
        out1 = self.conv1(pruned.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq))
        out1 = out1.view(b, ph, pw, *out1.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        out2 = self.conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hs, ws))
        out2 = out2.view(b, hq, wq, *out2.shape[1:]).permute(0, 3, 1, 2, 4, 5)
        return out1 + out2


def _block(in_channels, out_channels, kernels, strides):
    layers, channels = [], in_channels
    for out, kernel, stride in zip(out_channels, kernels, strides):
        layers += [CenterPivotConv4d(channels, out, kernel, stride), nn.GroupNorm(4, out)]
        layers.append(nn.ReLU(inplace=True))
        channels = out
    return nn.Sequential(*layers)


def _resize_support_dims(x, size):
    b, c, hq, wq, hs, ws = x.shape
    flat = x.permute(0, 4, 5, 1, 2, 3).reshape(b * hs * ws, c, hq, wq)
    flat = F.interpolate(flat, size, mode="bilinear", align_corners=True)
    return flat.view(b, hs, ws, c, *size).permute(0, 3, 4, 5, 1, 2)


class HPNLearner(nn.Module):
    """The official learner (model/learner.py), parameter names kept."""

    def __init__(self, inch):
        super().__init__()
        c1, c2, c3 = 16, 64, 128
        self.encoder_layer4 = _block(inch[0], [c1, c2, c3], [3, 3, 3], [2, 2, 2])
        self.encoder_layer3 = _block(inch[1], [c1, c2, c3], [5, 3, 3], [4, 2, 2])
        self.encoder_layer2 = _block(inch[2], [c1, c2, c3], [5, 5, 3], [4, 4, 2])
        self.encoder_layer4to3 = _block(c3, [c3, c3, c3], [3, 3, 3], [1, 1, 1])
        self.encoder_layer3to2 = _block(c3, [c3, c3, c3], [3, 3, 3], [1, 1, 1])
        self.decoder1 = nn.Sequential(
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(), nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU()
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, 2, 3, padding=1)
        )

    def forward(self, pyramid):
        sqz4 = self.encoder_layer4(pyramid[0])
        sqz3 = self.encoder_layer3(pyramid[1])
        sqz2 = self.encoder_layer2(pyramid[2])
        mix43 = self.encoder_layer4to3(_resize_support_dims(sqz4, sqz3.shape[2:4]) + sqz3)
        mix432 = self.encoder_layer3to2(_resize_support_dims(mix43, sqz2.shape[2:4]) + sqz2)
        encoded = mix432.flatten(4).mean(-1)
        decoded = self.decoder1(encoded)
        size = (decoded.shape[-1] * 2,) * 2  # the official squares it on the width
        decoded = F.interpolate(decoded, size, mode="bilinear", align_corners=True)
        return self.decoder2(decoded)


class HSNet(FewShotMethod):
    cacheable_encoder = True
    feature_layout = "maps"
    output_kind = "labels"
    batched_loss = True  # a step's episodes are one batch, as the official step

    def __init__(
        self, backbone: str = "resnet50", pretrained=None, blocks=None, freeze_backbone=True
    ):
        super().__init__()
        if backbone not in BOTTLENECKS:
            raise FsbenchError(f"HSNet backbone {backbone!r}: one of {sorted(BOTTLENECKS)}")
        if blocks is not None and (backbone == "vgg16" or pretrained):
            raise FsbenchError("HSNet blocks=[…] (a shallower ResNet) is for untrained backbones")
        self.backbone_type = backbone
        counts = list(blocks) if blocks is not None else BOTTLENECKS[backbone]
        if blocks is not None:
            self.backbone = models.ResNet(models.resnet.Bottleneck, counts)
        else:
            self.backbone = getattr(models, backbone)(weights=None)
        self.lids = reduce(add, [[i + 1] * n for i, n in enumerate(counts)])
        stack = torch.tensor(self.lids).bincount().flip(0).cumsum(0)[:3]
        self.stack_ids = [int(s) for s in stack]
        self.hpn_learner = HPNLearner(list(reversed(counts[-3:])))
        if pretrained:
            self._load_imagenet(pretrained)
        # The official backbone is frozen (features under no_grad, BatchNorm in eval); an
        # untrained one on generated data may learn (`freeze_backbone: false`).
        self.freeze_backbone = bool(freeze_backbone)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self.freeze_backbone)
        self.backbone.train(not self.freeze_backbone and self.training)

    def _load_imagenet(self, pretrained) -> None:
        name = WEIGHT_FILES[self.backbone_type]
        path = imagenet_weights_path(name) if pretrained == "imagenet" else pretrained
        state = read_state_dict(
            path, f"torchvision {self.backbone_type} file", f"put torchvision's {name} there"
        )
        try:
            self.backbone.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise FsbenchError(
                f"{path}: not a torchvision {self.backbone_type} state dict ({first[:160]})"
            ) from None

    def load_official_state_dict(self, state_dict) -> None:
        """A released HSNet checkpoint (`model.state_dict()` of the official model, with or
        without DataParallel's `module.`)."""
        names = {"backbone": "backbone", "hpn_learner": "hpn_learner"}
        load_mapped_state_dict(self, state_dict, names, "HSNet")

    def param_groups(self) -> dict[str, list]:
        return {
            "backbone": list(self.backbone.parameters()),
            "learner": list(self.hpn_learner.parameters()),
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # as the official train_mode(): no BatchNorm statistics learnt
        return self

    # -- encodings ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self._encode(images)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.backbone_type == "vgg16":
            feats, x = [], images
            for index, module in enumerate(self.backbone.features):
                x = module(x)
                if index in VGG_FEATURES:
                    feats.append(x.clone())  # before the in-place ReLU that follows
            return tuple(feats)
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        feats = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in stage:
                out = block.relu(block.bn1(block.conv1(x)))
                out = block.relu(block.bn2(block.conv2(out)))
                out = block.bn3(block.conv3(out))
                out = out + (x if block.downsample is None else block.downsample(x))
                if stage is not net.layer1:
                    feats.append(out)
                x = torch.relu(out)  # not in place: `out` is kept
        return tuple(feats)

    def correlation(self, query_features, support_features, support_fg):
        """The three hypercorrelation tensors of queries [Q, …] with supports [Q or 1, …] under
        their masks [Q or 1, H, W] (one support is broadcast over the queries)."""
        corrs = []
        for index, (query, support) in enumerate(zip(query_features, support_features)):
            mask = F.interpolate(
                support_fg[:, None].float(), support.shape[-2:], mode="bilinear", align_corners=True
            )
            query, masked = self.transform_pair(index, query, support, mask)
            s = masked.flatten(2)
            s = s / (s.norm(dim=1, keepdim=True) + CORRELATION_EPS)
            q = query.flatten(2)
            q = q / (q.norm(dim=1, keepdim=True) + CORRELATION_EPS)
            corr = torch.matmul(q.transpose(1, 2), s).clamp(min=0)
            corrs.append(corr.view(q.shape[0], *query.shape[-2:], *support.shape[-2:]))
        shaped = corrs
        s4, s3, s2 = self.stack_ids
        return [
            torch.stack(shaped[-s4:], 1),
            torch.stack(shaped[-s3:-s4], 1),
            torch.stack(shaped[-s2:-s3], 1),
        ]

    def transform_pair(self, index: int, query, support, mask):
        """The query features and the masked support features of one layer as they are
        correlated (HSNet: as they are; PATNet transforms both, methods/patnet.py)."""
        return query, support * mask

    def shot_logits(self, support_features, support_fg, query_features, out_size):
        """1-shot logits [Q, 2, H, W] of queries against supports (encodings [Q or 1, …])."""
        logits = self.hpn_learner(self.correlation(query_features, support_features, support_fg))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True)

    def logits(self, episode: Episode) -> torch.Tensor:
        """Every (class, shot)'s 1-shot logits [Q, N, K, 2, H, W] at the episode's image size:
        what the official forward returns for each support."""
        support, query = self.encode_episode(episode)
        way, shot = episode.support_fg.shape[:2]
        size = episode.query_labels.shape[-2:]
        return torch.stack(
            [
                torch.stack(
                    [
                        self.shot_logits(
                            tuple(f[n, k : k + 1] for f in support),
                            episode.support_fg[n, k : k + 1],
                            query,
                            size,
                        )
                        for k in range(shot)
                    ],
                    1,
                )
                for n in range(way)
            ],
            1,
        )

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        way, shot = support_fg.shape[:2]
        votes = []
        for n in range(way):
            agg = 0
            for k in range(shot):
                logits = self.shot_logits(
                    tuple(f[n, k : k + 1] for f in support_features),
                    support_fg[n, k : k + 1],
                    query_features,
                    out_size,
                )
                agg = agg + logits.argmax(1)
            votes.append(vote(agg, shot))
        votes = torch.stack(votes, 1)  # [Q, N, H, W] normalised votes
        best, index = votes.max(1)
        return torch.where(best >= 0.5, index + 1, torch.zeros_like(index))

    def loss_batch(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """Cross-entropy of every (episode, class, shot, query) as one 1-shot batch, as the
        official training step computes its batch of episodes."""
        queries, supports, masks, targets = [], [], [], []
        for episode in episodes:
            way, shot = episode.support_fg.shape[:2]
            for n in range(way):
                target = (episode.query_labels == n + 1).long()  # ignore (255) → background
                for k in range(1):  # the official trains 1-shot: a k-shot episode trains its
                    for q in range(target.shape[0]):  # first support's 1-shot episode
                        queries.append(episode.query_images[q])
                        supports.append(episode.support_images[n, k])
                        masks.append(episode.support_fg[n, k])
                        targets.append(target[q])
        query = torch.stack(queries)
        logits = self.shot_logits(
            self.encode(torch.stack(supports)), torch.stack(masks), self.encode(query),
            query.shape[-2:],
        )  # fmt: skip
        total = F.cross_entropy(logits, torch.stack(targets))
        return {"segmentation": total, "total": total}

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        return self.loss_batch([episode])


def vote(agg: torch.Tensor, shot: int) -> torch.Tensor:
    """`predict_mask_nshot`'s vote, normalised: agg [Q, H, W] (sum of k argmaxes) → agg for one
    shot, else agg / max(largest vote, 1) quantised at 0.5 (1.0 or 0.0)."""
    if shot == 1:
        return agg.float()
    largest = agg.flatten(1).max(1).values.clamp(min=1).view(-1, 1, 1)
    return (agg.float() / largest >= 0.5).float()


@METHODS.register(display="HSNet")
def hsnet(backbone: str = "resnet50", pretrained=None, blocks=None, freeze_backbone=True) -> HSNet:
    """HSNet (ICCV 2021): multi-layer hypercorrelation squeezed by centre-pivot 4D convolutions;
    backbone resnet50 | resnet101 | vgg16 (ImageNet weights: pretrained=imagenet or a path)."""
    return HSNet(backbone, pretrained, blocks, freeze_backbone)
