"""PFENet (Tian et al., TPAMI 2020): prior guided feature enrichment network.

The network of dvlab-research/PFENet model/PFENet.py with its parameter names, so its released
checkpoints (`{'state_dict': …}`) load (`load_official_state_dict`) and give its logits
(tests/test_parity.py, fixtures recorded from the official code):
- backbone: ResNet-50/101 with the deep stem of its model/resnet.py (three 3×3 convs; ImageNet
  `resnet50_v2.pth` / `resnet101_v2.pth` from $FSBENCH_WEIGHTS), layer 3 dilated 2 and layer 4
  dilated 4 (output stride 8); or VGG-16-BN (`vgg: true`, torchvision's vgg16_bn file), cut as
  its `get_vgg16_layer`. Frozen (no gradients), BatchNorm as the official loop leaves it:
  batch statistics while training (`model.train()`), running ones in eval.
- support layer-3 features masked (bilinear, align_corners=True) before layer 4;
- the training-free prior: for each query position the largest cosine similarity of its
  layer-4 feature to the masked support's, min-max normalised per image (eps 1e-7); averaged
  over shots;
- prototypes: `Weighted_GAP` of the reduced layer-3 ‖ layer-2 support features (Σ f·m /
  (Σ m + 5e-4)), averaged over shots;
- feature enrichment module over `ppm_scales` [60, 30, 15, 8] with inter-scale merging (each
  scale gets the previous one's features), an auxiliary classifier per scale, res1/res2, cls;
  logits upsampled ×8 to the input (align_corners=True), then to the output size.
Inputs must be S×S with (S − 1) % 8 == 0 (its assertion), checked when a grid is expanded.
Training: cross-entropy (ignore 255) of the main and every auxiliary output (aux weight 1), the
episodes of a step as one batch (`loss_batch`) with queries and each shot's supports passing the
backbone as separate batches, as the official forward does. N-way (no official code): one binary
head per class, combined as fsbench's other binary methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import combine_binary_heads
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import imagenet_weights_path, load_mapped_state_dict, read_state_dict

WEIGHT_FILES = {50: "resnet50_v2.pth", 101: "resnet101_v2.pth", "vgg": "vgg16_bn-6c64b313.pth"}
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
VGG_CUTS = (0, 7, 14, 24, 34, 43)  # get_vgg16_layer's layer0 … layer4 of vgg16_bn.features
COSINE_EPS = 1e-7
AREA_EPS = 5e-4
HEAD = ("down_query", "down_supp", "init_merge", "alpha_conv", "beta_conv", "inner_cls")
HEAD += ("res1", "res2", "cls")


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def deep_stem_resnet(blocks) -> nn.ModuleList:
    """layer0 … layer4 of model/resnet.py's deep-base ResNet, dilated as PFENet.__init__."""
    stem = nn.Sequential(
        _conv3x3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv3x3(64, 128), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )  # fmt: skip
    layers, inplanes = [stem], 128
    for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        stride = 1 if index == 0 else 2
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * 4),
        )
        stage = [Bottleneck(inplanes, planes, stride, downsample)]
        inplanes = planes * 4
        stage += [Bottleneck(inplanes, planes) for _ in range(1, count)]
        layers.append(nn.Sequential(*stage))
    for stage, dilation in ((layers[3], 2), (layers[4], 4)):
        for name, module in stage.named_modules():
            if "conv2" in name:
                module.dilation = module.padding = (dilation, dilation)
                module.stride = (1, 1)
            elif "downsample.0" in name:
                module.stride = (1, 1)
    return nn.ModuleList(layers)


def vgg16_bn_layers() -> nn.ModuleList:
    features = list(models.vgg16_bn(weights=None).features)
    return nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in zip(VGG_CUTS, VGG_CUTS[1:]))


def load_imagenet_backbone(backbone: nn.ModuleList, pretrained, layers: int, vgg: bool) -> None:
    """ImageNet weights into layer0 … layer4: `pretrained` "imagenet" (the named file in
    $FSBENCH_WEIGHTS: PFENet's initmodel resnet{50,101}_v2.pth, or torchvision's vgg16_bn) or a
    path."""
    key = "vgg" if vgg else layers
    path = imagenet_weights_path(WEIGHT_FILES[key]) if pretrained == "imagenet" else pretrained
    state = read_state_dict(
        path, "ImageNet backbone file", f"put {WEIGHT_FILES[key]} (PFENet's initmodel) there"
    )
    if vgg:
        ends = VGG_CUTS[1:]
        names = {}
        for index in range(VGG_CUTS[-1]):
            layer = next(i for i, end in enumerate(ends) if index < end)
            names[f"features.{index}"] = f"{layer}.{index - VGG_CUTS[layer]}"
    else:
        stem = ("conv1", "bn1", "", "conv2", "bn2", "", "conv3", "bn3")
        names = {n: f"0.{i}" for i, n in enumerate(stem) if n}
        names.update({f"layer{i}": str(i) for i in range(1, 5)})
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    load_mapped_state_dict(backbone, state, names, f"ImageNet backbone {path}")


def stride8_problem(name: str, size: int) -> str | None:
    """The PFENet lineage's input rule, (S − 1) % 8 == 0 (its ×8 upsampling to S): None when
    S fits, else the rule and the nearest sizes."""
    if (size - 1) % 8 == 0:
        return None
    below = size - (size - 1) % 8
    return f"{name} needs (S − 1) % 8 == 0; nearest input sizes: {below} or {below + 8}"


def binary_batch(episodes: list[Episode]):
    """The episodes as one batch of binary episodes (each class of an N-way episode one per
    query): queries [B, 3, H, W], supports [B, K, 3, H, W], support masks [B, K, H, W], targets
    [B, H, W] (1 the class, 0 else, 255 void) and, per row, (episode, class index, query index)."""
    queries, supports, masks, targets, rows = [], [], [], [], []
    for episode in episodes:
        labels = episode.query_labels
        for n in range(episode.way):
            target = torch.where(labels == n + 1, 1, torch.where(labels == 255, 255, 0))
            for q in range(labels.shape[0]):
                queries.append(episode.query_images[q])
                supports.append(episode.support_images[n])
                masks.append(episode.support_fg[n])
                targets.append(target[q])
                rows.append((episode, n, q))
    return (
        torch.stack(queries), torch.stack(supports), torch.stack(masks),
        torch.stack(targets).long(), rows,
    )  # fmt: skip


def weighted_gap(features, mask):
    """Weighted_GAP: Σ f·m / (Σ m + 5e-4), as the official ops."""
    features = features * mask
    h, w = features.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + AREA_EPS
    return F.avg_pool2d(features, (h, w)) * h * w / area


def prior_mask(query4, support4, mask):
    """The prior [B, 1, h, w]: per query position the largest cosine similarity to the masked
    support layer-4 features, min-max normalised per image."""
    b, c, h, w = query4.shape
    mask = F.interpolate(mask, support4.shape[-2:], mode="bilinear", align_corners=True)
    support = (support4 * mask).flatten(2).permute(0, 2, 1)
    query = query4.flatten(2)
    similarity = torch.bmm(support, query) / (
        torch.bmm(support.norm(2, 2, True), query.norm(2, 1, True)) + COSINE_EPS
    )
    similarity = similarity.max(1)[0]
    low, high = similarity.min(1)[0][:, None], similarity.max(1)[0][:, None]
    return ((similarity - low) / (high - low + COSINE_EPS)).view(b, 1, h, w)


def _relu_conv(cin, cout, kernel, dropout=None):
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.Dropout2d(dropout)] if dropout else []))


def _two_convs(dim):
    return nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3))


def _classifier(dim):
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Dropout2d(0.1), nn.Conv2d(dim, 2, 1),
    )  # fmt: skip


class PFENet(FewShotMethod):
    batched_loss = True

    def __init__(
        self,
        layers=50,
        vgg=False,
        ppm_scales=(60, 30, 15, 8),
        pretrained=None,
        blocks=None,
        reduce_dim=256,
        freeze_backbone=True,
    ):
        super().__init__()
        if not vgg and layers not in BLOCKS:
            raise FsbenchError(f"PFENet layers={layers}: one of {sorted(BLOCKS)} (or vgg: true)")
        if blocks is not None and (vgg or pretrained):
            raise FsbenchError("PFENet blocks=[…] (a shallower ResNet) is for untrained backbones")
        self.vgg, self.layers, self.ppm_scales = bool(vgg), layers, tuple(ppm_scales)
        blocks = tuple(blocks) if blocks is not None else BLOCKS[layers]
        self.backbone = vgg16_bn_layers() if vgg else deep_stem_resnet(blocks)
        dim, feat_dim = reduce_dim, (512 + 256) if vgg else (1024 + 512)
        self.cls = _classifier(dim)
        self.down_query = _relu_conv(feat_dim, dim, 1, 0.5)
        self.down_supp = _relu_conv(feat_dim, dim, 1, 0.5)
        self.init_merge = nn.ModuleList(_relu_conv(2 * dim + 1, dim, 1) for _ in ppm_scales)
        self.beta_conv = nn.ModuleList(_two_convs(dim) for _ in ppm_scales)
        self.inner_cls = nn.ModuleList(_classifier(dim) for _ in ppm_scales)
        self.res1 = _relu_conv(dim * len(ppm_scales), dim, 1)
        self.res2 = _two_convs(dim)
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.ReLU())
            for _ in range(len(ppm_scales) - 1)
        )
        if pretrained:
            load_imagenet_backbone(self.backbone, pretrained, layers, vgg)
        # The official backbone is frozen (no_grad); an untrained one on generated data may
        # learn (`freeze_backbone: false`).
        self.freeze_backbone = bool(freeze_backbone)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self.freeze_backbone)

    @classmethod
    def input_size_problem(cls, size: int) -> str | None:
        return stride8_problem("PFENet", size)

    # -- weights ------------------------------------------------------------------------------
    def _official_names(self) -> dict[str, str]:
        names = {name: name for name in HEAD}
        names.update({f"layer{i}": f"backbone.{i}" for i in range(5)})
        return names

    def load_official_state_dict(self, state_dict) -> None:
        """A released PFENet checkpoint: its `state_dict` (`{'state_dict': …}` files are
        unwrapped by `read_state_dict`), with or without DataParallel's `module.`."""
        load_mapped_state_dict(self, state_dict, self._official_names(), "PFENet")

    def param_groups(self) -> dict[str, list]:
        return {
            "backbone": list(self.backbone.parameters()),
            "head": [p for name in HEAD for p in getattr(self, name).parameters()],
        }

    # -- the network ---------------------------------------------------------------------------
    def _features(self, images, mask=None):
        """(layer-2, layer-3, layer-4) features of a batch; with `mask` (full size, [B, 1, H,
        W]), layer 4 sees layer 3 masked (a support). Layer 2 is resized to layer 3 for VGG."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            x = images
            for layer in self.backbone[:3]:
                x = layer(x)
            feat2, feat3 = x, self.backbone[3](x)
            if mask is not None:
                mask = F.interpolate(mask, feat3.shape[-2:], mode="bilinear", align_corners=True)
            feat4 = self.backbone[4](feat3 if mask is None else feat3 * mask)
            if self.vgg:
                feat2 = F.interpolate(feat2, feat3.shape[-2:], mode="bilinear", align_corners=True)
        return feat2, feat3, feat4, mask

    def head(self, query, supports, masks):
        """Main and auxiliary logits at the feature size, for queries [B, 3, H, W] and their
        supports [B, K, 3, H, W] under full-size masks [B, K, H, W] (0/1)."""
        q2, q3, q4, _ = self._features(query)
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        prototypes, priors = [], []
        for k in range(supports.shape[1]):
            full = masks[:, k : k + 1].float()
            s2, s3, s4, mask = self._features(supports[:, k], full)
            prototype = self.down_supp(torch.cat([s3, s2], 1))
            prototypes.append(weighted_gap(prototype, mask))
            prior = prior_mask(q4, s4, full)
            priors.append(F.interpolate(prior, q3.shape[-2:], mode="bilinear", align_corners=True))
        prior = torch.cat(priors, 1).mean(1, keepdim=True)
        prior = F.interpolate(prior, query_feat.shape[-2:], mode="bilinear", align_corners=True)
        prototype = sum(prototypes[1:], prototypes[0]) / len(prototypes)
        outputs, pyramid = [], []
        for index, scale in enumerate(self.ppm_scales):
            if scale <= 1:  # the official's fractional bins: a share of the feature size
                scale = int(query_feat.shape[2] * scale)
            query_bin = F.adaptive_avg_pool2d(query_feat, scale)
            prior_bin = F.interpolate(prior, (scale, scale), mode="bilinear", align_corners=True)
            merged = self.init_merge[index](
                torch.cat([query_bin, prototype.expand(-1, -1, scale, scale), prior_bin], 1)
            )
            if index >= 1:
                previous = F.interpolate(
                    pyramid[index - 1], (scale, scale), mode="bilinear", align_corners=True
                )
                merged = self.alpha_conv[index - 1](torch.cat([merged, previous], 1)) + merged
            merged = self.beta_conv[index](merged) + merged
            outputs.append(self.inner_cls[index](merged))
            pyramid.append(
                F.interpolate(merged, query_feat.shape[-2:], mode="bilinear", align_corners=True)
            )
        query_feat = self.res1(torch.cat(pyramid, 1))
        query_feat = self.res2(query_feat) + query_feat
        return self.cls(query_feat), outputs

    @staticmethod
    def _upsample(logits, input_size, out_size=None):
        """×8 to the input (align_corners=True), then to the scoring size when it differs."""
        logits = F.interpolate(logits, input_size, mode="bilinear", align_corners=True)
        if out_size is not None and tuple(out_size) != tuple(input_size):
            logits = F.interpolate(logits, out_size, mode="bilinear", align_corners=True)
        return logits

    def forward(self, episode: Episode) -> torch.Tensor:
        """Logits [Q, 1+N, H, W] at the query labels' size: one binary head per class."""
        queries = episode.query_images
        size, out_size = queries.shape[-2:], episode.query_labels.shape[-2:]
        heads = []
        for n in range(episode.way):
            supports = episode.support_images[n][None].expand(queries.shape[0], -1, -1, -1, -1)
            masks = episode.support_fg[n][None].expand(queries.shape[0], -1, -1, -1)
            main, _ = self.head(queries, supports, masks)
            heads.append(self._upsample(main, size, out_size))
        return heads[0] if len(heads) == 1 else combine_binary_heads(heads)

    def loss_batch(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """Main + auxiliary cross-entropy (ignore 255) of the episodes as one batch (each
        class of an N-way episode a binary episode of its own)."""
        query, supports, masks, target, _ = binary_batch(episodes)
        main, auxiliary = self.head(query, supports, masks)
        size = query.shape[-2:]
        main_loss = F.cross_entropy(self._upsample(main, size), target, ignore_index=255)
        aux = [
            F.cross_entropy(self._upsample(o, size), target, ignore_index=255) for o in auxiliary
        ]
        aux_loss = torch.stack(aux).mean()
        return {"main": main_loss, "aux": aux_loss, "total": main_loss + aux_loss}

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        return self.loss_batch([episode])


@METHODS.register(display="PFENet")
def pfenet(
    layers: int = 50,
    vgg: bool = False,
    ppm_scales=(60, 30, 15, 8),
    pretrained=None,
    blocks=None,
    reduce_dim: int = 256,
    freeze_backbone: bool = True,
) -> PFENet:
    """PFENet (TPAMI 2020): training-free prior mask + feature enrichment; ResNet-50/101 with
    the deep stem (layers) or VGG-16-BN (vgg: true); ImageNet: pretrained=imagenet or a path."""
    return PFENet(layers, vgg, tuple(ppm_scales), pretrained, blocks, reduce_dim, freeze_backbone)
