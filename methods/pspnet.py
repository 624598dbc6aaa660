"""PSPNet base learner (BAM, Lang et al. CVPR 2022; reused by HDMNet, CVPR 2023).

The network of chunbolang/BAM model/PSPNet.py with its parameter names, so the base-learner
files its training writes (`initmodel/PSPNet/{pascal,coco}/split{F}/{resnet50,vgg}/best.pth`,
`{'state_dict': …}`) load (`load_official_state_dict`):
- backbone: PFENet's (deep-stem ResNet-50/101 dilated to output stride 8, or VGG-16-BN cut as
  `get_vgg16_layer`), trained here (the base stage trains the whole network);
- PPM over bins (1, 2, 3, 6) (adaptive average pool, 1×1 conv, BatchNorm, ReLU; upsampled with
  align_corners=True) concatenated to the features;
- cls: 3×3 conv to 512, BatchNorm, ReLU, Dropout2d(0.1), 1×1 conv to 1 + B classes (background
  and the fold's B training classes: 16 on PASCAL-5i, 61 on COCO-20i);
- logits upsampled ×8 (align_corners=True); cross-entropy with void 255 ignored.
Trained on image batches with base-class labels (`sampler: images`, `loss_images`), labels 1…B
in ascending class-id order, as BAM's BaseData maps `sub_list.index(c) + 1`.

As a few-shot method on its own (no official use): each query position is scored by the cosine
similarity of its 512-d head features (cls[:3]) to the support's masked-average foreground and
background prototypes (×20, PANet's metric) — the base learner's features as a baseline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode, ImageBatch
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import masked_average_pool
from fsbench.methods.pfenet import (
    BLOCKS,
    deep_stem_resnet,
    load_imagenet_backbone,
    stride8_problem,
    vgg16_bn_layers,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import load_mapped_state_dict, read_state_dict

BINS = (1, 2, 3, 6)
SCALER = 20.0  # the prototype metric of the stand-alone few-shot use (PANet's α-free scale)


class PPM(nn.Module):
    """Pyramid pooling: the features, then per bin pool → 1×1 conv → BN → ReLU, upsampled."""

    def __init__(self, in_dim: int, reduction_dim: int, bins=BINS):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [
            F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features
        ]
        return torch.cat([x, *pooled], 1)


def psp_classifier(feature_dim: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(feature_dim * 2, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
        nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(512, classes, 1),
    )  # fmt: skip


def build_backbone(layers: int, vgg: bool, blocks=None) -> nn.ModuleList:
    if not vgg and layers not in BLOCKS:
        raise FsbenchError(f"layers={layers}: one of {sorted(BLOCKS)} (or vgg: true)")
    return vgg16_bn_layers() if vgg else deep_stem_resnet(tuple(blocks or BLOCKS[layers]))


def backbone_names(prefix: str = "backbone") -> dict[str, str]:
    """The official layer0 … layer4 (and PSPNet's duplicate `encoder.i`) → fsbench's modules."""
    names = {f"layer{i}": f"{prefix}.{i}" for i in range(5)}
    names.update({f"encoder.{i}": f"{prefix}.{i}" for i in range(5)})
    return names


def base_learner_problem(path, fold: int | None = None) -> str | None:
    """What is wrong with a base-learner file before it is read: absent, or (BAM's layout
    `…/split{F}/…`) another fold's. None when nothing is seen wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        return (
            f"{path}: base-learner file not found; train one (an init_from: entry of "
            "pspnet_base) or give BAM's initmodel/PSPNet/<dataset>/split<F>/<backbone>/best.pth"
        )
    match = re.search(r"split(\d+)", str(path))
    if fold is not None and match and int(match.group(1)) != fold:
        held = match.group(1)
        return (
            f"{path}: is fold {held}'s base learner (its path says split{held}); this cell is "
            f"fold {fold} — use split{fold}'s file"
        )
    return None


def load_base_learner(model, path, classes: int, vgg: bool, what: str) -> None:
    """A PSPNet file (BAM's `best.pth`) into `model`'s backbone and base learner, refusing a
    file of another class count or backbone in one line that says what the file holds."""
    state = read_state_dict(path, "base-learner file", "check the `base_learner:` path")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    head = next((v for k, v in state.items() if re.fullmatch(r"cls\.4\.weight", k)), None)
    if head is None:
        keys = ", ".join(list(state)[:3])
        raise FsbenchError(f"{path}: not a PSPNet base learner (no cls.4.weight; keys {keys} …)")
    held = "ResNet" if "layer4.0.conv1.weight" in state else "VGG-16-BN"
    depth = ("-101" if "layer3.22.conv1.weight" in state else "-50") if held == "ResNet" else ""
    if head.shape[0] != classes:
        raise FsbenchError(
            f"{path}: a base learner of {head.shape[0]} classes ({head.shape[0] - 1} base classes "
            f"+ background, {held}{depth}); {what} expects {classes} — use the file of this "
            "dataset (PASCAL-5i: 16, COCO-20i: 61)"
        )
    wanted = "VGG-16-BN" if vgg else "ResNet"
    if held != wanted:
        raise FsbenchError(
            f"{path}: a {held}{depth} base learner; {what} is built with {wanted} "
            f"({'vgg: true' if vgg else 'layers: 50/101'}) — use the file of that backbone"
        )
    try:
        model.load_base_learner_state(state)
    except FsbenchError as error:
        raise FsbenchError(f"{path}: {error}") from None


class PSPNetBase(FewShotMethod):
    """BAM's base learner; see the module docstring."""

    base_class_labels = True
    version = "1"

    def __init__(self, layers=50, vgg=False, classes=16, pretrained=None, blocks=None):
        super().__init__()
        if blocks is not None and (vgg or pretrained):
            raise FsbenchError(
                "pspnet_base blocks=[…] (a shallower ResNet) is for untrained backbones"
            )
        self.vgg, self.layers, self.classes = bool(vgg), layers, int(classes)
        self.backbone = build_backbone(layers, vgg, blocks)
        dim = 512 if vgg else 2048
        self.ppm = PPM(dim, dim // len(BINS))
        self.cls = psp_classifier(dim, self.classes)
        if pretrained:
            load_imagenet_backbone(self.backbone, pretrained, layers, vgg)

    @classmethod
    def default_stages(cls):
        # BAM train_base.py: the whole network on image batches (recipe pspnet_base has the rest)
        return ({"name": "base", "params": ["all"], "sampler": "images"},)

    @classmethod
    def input_size_problem(cls, size: int) -> str | None:
        return stride8_problem("PSPNet", size)

    def param_groups(self) -> dict[str, list]:
        # train_base.py's optimiser groups: encoder (index_split 0: base lr), ppm, cls (× 10)
        return {
            "backbone": list(self.backbone.parameters()),
            "head": [*self.ppm.parameters(), *self.cls.parameters()],
        }

    def load_official_state_dict(self, state_dict) -> None:
        """A PSPNet `best.pth` of BAM's train_base.py (`{'state_dict': …}`, `module.` or not)."""
        load_mapped_state_dict(
            self, state_dict, {**backbone_names(), "ppm": "ppm", "cls": "cls"}, "PSPNet"
        )

    def load_base_learner_state(self, state_dict) -> None:
        self.load_official_state_dict(state_dict)

    def official_state_dict(self) -> dict:
        """The state dict under the official PSPNet names (layerN, ppm, cls), as BAM's
        `best.pth` holds it: what a BAM/HDMNet model takes over (`init_from`)."""
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("backbone."):
                _, index, rest = key.split(".", 2)
                key = f"layer{index}.{rest}"
            out[key] = value
        return out

    def logits(self, images):
        """[B, classes, h, w] upsampled ×8 as the official forward ((S − 1)/8·8 + 1 = S)."""
        x = images
        for layer in self.backbone:
            x = layer(x)
        h, w = images.shape[-2:]
        size = ((h - 1) // 8 * 8 + 1, (w - 1) // 8 * 8 + 1)
        return F.interpolate(self.cls(self.ppm(x)), size, mode="bilinear", align_corners=True)

    def loss_images(self, batch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.images)
        labelled = batch.labels[batch.labels != 255]
        if labelled.numel() and int(labelled.max()) >= self.classes:
            raise FsbenchError(
                f"pspnet_base classes={self.classes}, but the fold has at least "
                f"{int(labelled.max())} training classes; set "
                "kwargs classes: 1 + that number (PASCAL-5i 16, COCO-20i 61)"
            )
        return {"total": F.cross_entropy(logits, batch.labels, ignore_index=255)}

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        """An episode's queries with their base-class labels, as an image batch."""
        if episode.query_base_labels is None:
            raise FsbenchError("pspnet_base trains on base-class labels (base_class_labels)")
        return self.loss_images(ImageBatch(episode.query_images, episode.query_base_labels))

    def _head_features(self, images):
        x = images
        for layer in self.backbone:
            x = layer(x)
        return self.cls[:3](self.ppm(x))

    def forward(self, episode: Episode) -> torch.Tensor:
        way, shot = episode.support_fg.shape[:2]
        support = self._head_features(episode.support_images.flatten(0, 1))
        query = self._head_features(episode.query_images)
        fg = masked_average_pool(support, episode.support_fg.flatten(0, 1)).view(way, shot, -1)
        bg = masked_average_pool(support, episode.support_bg.flatten(0, 1)).mean(0, keepdim=True)
        prototypes = torch.cat([bg, fg.mean(1)])
        scores = SCALER * torch.einsum(
            "qchw,nc->qnhw", F.normalize(query, dim=1), F.normalize(prototypes, dim=1)
        )
        return F.interpolate(
            scores, episode.query_labels.shape[-2:], mode="bilinear", align_corners=True
        )


@METHODS.register(display="PSPNet base learner")
def pspnet_base(
    layers: int = 50, vgg: bool = False, classes: int = 16, pretrained=None, blocks=None
) -> PSPNetBase:
    """BAM's PSPNet base learner over the fold's training classes (classes = 1 + B: PASCAL-5i
    16, COCO-20i 61), trained on image batches; ResNet-50/101 (layers) or VGG-16-BN."""
    return PSPNetBase(layers, vgg, classes, pretrained, blocks)
