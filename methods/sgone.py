"""SG-One (Zhang et al., 2018): similarity guidance from a masked-average support vector.

As the official code (models/vgg/vgg_sg.py, oneshot/onemodel_sg-one.py): a DeepLab-style VGG-16
(pool4 and pool5 with stride 1, output stride 8), a guidance head (3×3 conv on conv5) whose
support vector is compared by cosine with every query position, and a segmentation branch that
fuses conv3/4/5 into 128 channels, is multiplied by the similarity map, then conv + 1×1 to 2
classes (the official exit conv has padding=1: a border of bias-only logits, kept, and upsampled
with the rest as its get_pred does). k shots average the support vectors (its
forward_5shot_avg). Initialisation as the official: Xavier-uniform in the VGG part, torch's
defaults in the two exit convs. Official checkpoints load (`load_official_state_dict`); the
logits equal the official forward's (tests/test_parity.py). N-way episodes combine N binary
heads (background = all heads say background); the official code is 1-way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import (
    VGG16Encoder,
    combine_binary_heads,
    masked_average_pool,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import load_mapped_state_dict

# DeepLab VGG-16: (convs, channels) per block; pools 1-3 stride 2, pools 4-5 stride 1 (3×3).
BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


class SGOne(FewShotMethod):
    cacheable_encoder = True

    def __init__(self, width: float = 1.0, pretrained: str | None = None, init: str = "official"):
        super().__init__()
        channels = [max(1, round(c * width)) for _, c in BLOCKS]
        side = max(1, round(128 * width))
        self.blocks = nn.ModuleList()
        in_channels = 3
        for index, ((n_convs, _), out) in enumerate(zip(BLOCKS, channels)):
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += [nn.Conv2d(in_channels, out, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = out
            layers.append(nn.MaxPool2d(3, stride=2 if index < 3 else 1, padding=1))
            self.blocks.append(nn.Sequential(*layers))
        self.guidance = nn.Conv2d(channels[4], channels[4], 3, padding=1)
        self.side3 = nn.Sequential(nn.Conv2d(channels[2], side, 3, padding=1), nn.ReLU())
        self.side4 = nn.Sequential(nn.Conv2d(side + channels[3], side, 3, padding=1), nn.ReLU())
        self.side5 = nn.Conv2d(side + channels[4], side, 3, padding=1)
        self.classifier = nn.Sequential(nn.Conv2d(side, side, 3, padding=1), nn.ReLU(inplace=True))
        self.exit = nn.Conv2d(side, 2, 1, padding=1)
        # vgg_sg.py's _initialize_weights covers the VGG part only; `init: xavier` extends it
        # to the two exit convs (what fsbench used before matching the official code).
        if init not in ("official", "xavier"):
            raise FsbenchError(f"SG-One init {init!r} is not official or xavier")
        exits = {id(m) for m in (*self.classifier, self.exit)} if init == "official" else set()
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in exits:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if pretrained:
            self._load_vgg(pretrained, width)
        self.to(memory_format=torch.channels_last)

    def _load_vgg(self, pretrained: str, width: float) -> None:
        if width != 1:
            raise FsbenchError(f"pretrained VGG-16 weights need width=1, not width={width}")
        reference = VGG16Encoder(pretrained="imagenet" if pretrained == "imagenet" else pretrained)
        source = [m for m in reference.modules() if isinstance(m, nn.Conv2d)]
        target = [m for block in self.blocks for m in block if isinstance(m, nn.Conv2d)]
        for own, loaded in zip(target, source):  # the 13 backbone convs, in order
            own.load_state_dict(loaded.state_dict())

    def param_groups(self) -> dict[str, list]:
        """my_optim.get_finetune_optimizer's groups: weights, biases, and those of the guidance
        conv (its `cls`) apart (`train.lr_mult` scales each; official: 1, 2, 10, 20)."""
        groups: dict[str, list] = {"weight": [], "bias": [], "last_weight": [], "last_bias": []}
        for name, parameter in self.named_parameters():
            kind = "bias" if name.endswith("bias") else "weight"
            groups[("last_" if name.startswith("guidance") else "") + kind].append(parameter)
        return groups

    def load_official_state_dict(self, state_dict) -> None:
        """Weights saved from the official OneModel (xiaomengyc/SG-One, `model.state_dict()`,
        with or without DataParallel's `module.`)."""
        names = {
            **{f"netB.features_{i + 1}": f"blocks.{i}" for i in range(5)},
            "netB.cls.0": "guidance",
            "netB.side3_1": "side3",
            "netB.side4_1": "side4",
            "netB.side5_1.0": "side5",
            "classifier_6": "classifier",
            "exit_layer": "exit",
        }
        load_mapped_state_dict(self, state_dict, names, "SG-One")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Episode-independent features: guidance (C5) and side (128) maps, concatenated."""
        x = images.contiguous(memory_format=torch.channels_last)
        x = self.blocks[1](self.blocks[0](x))
        out3 = self.blocks[2](x)
        out4 = self.blocks[3](out3)
        out5 = self.blocks[4](out4)
        side = self.side3(out3)
        side = self.side4(torch.cat([side, out4], 1))
        side = self.side5(torch.cat([side, out5], 1))
        return torch.cat([self.guidance(out5), side], 1)

    def _split(self, features):
        side = self.side5.out_channels
        return features[:, :-side], features[:, -side:]

    def binary_logits(self, support_features, support_fg, query_features):
        """[Q, 2, h, w] background/foreground logits of one class (vectors averaged over shots)."""
        guidance_support, _ = self._split(support_features)
        vector = masked_average_pool(guidance_support, support_fg).mean(0)
        guidance_query, side_query = self._split(query_features)
        similarity = F.cosine_similarity(guidance_query, vector[None, :, None, None], dim=1)
        return self.exit(self.classifier(side_query * similarity[:, None]))

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        way = support_fg.shape[0]
        heads = [
            self.binary_logits(support_features[i], support_fg[i], query_features)
            for i in range(way)
        ]
        low = combine_binary_heads(heads)
        return F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        logits = self(episode)
        segmentation = F.cross_entropy(logits, episode.query_labels, ignore_index=255)
        return {"segmentation": segmentation, "total": segmentation}


@METHODS.register(display="SG-One")
def sgone(width=1.0, pretrained=None, init="official") -> SGOne:
    """SG-One with a VGG-16 backbone (ImageNet weights from a local torchvision file)."""
    return SGOne(width=width, pretrained=pretrained, init=init)
