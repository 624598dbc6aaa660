"""PATNet (Lei et al., ECCV 2022): HSNet with the Pyramid Anchor-based Transformation Module.

The network of slei109/PATNet `PATNetwork`, with its parameter names, so its released
checkpoints load (`load_official_state_dict`) and give its outputs (tests/test_parity_patnet.py,
fixtures recorded by running the official code): HSNet (methods/hsnet.py) in every part but
one — before the hypercorrelation, each layer's query features and masked support features are
transformed by P = (pinv(C) · R)ᵀ, where C stacks the support's background and foreground
prototypes (masked sums / (mask sums + 1e-6)) and R the weights of the stage's anchor layer
(`reference_layer1..3`: Linear(D, 2), only its weight is used), both row-normalised (norm +
1e-6). ResNet-50: layers 0–3 of the feature pyramid use anchor 1, 4–9 anchor 2, 10–12 anchor 3
(the stages' 512 / 1024 / 2048 channels); VGG-16: 0–3 anchor 1, 4–6 anchor 2 (anchor 3 unused),
as the official indices. ResNet-101 (not in the official code) takes the anchor of its stage.

k-shot: HSNet's vote. Training: HSNet's (cross-entropy of 1-shot logits); PATNet trains on
PASCAL with all 20 classes (`fold: all`) with Adam 1e-3, batch 2 (its train.py).

Task-adaptive fine-tuning inference (TFI, paper §3.4 and its supplement: Adam on the PATM only,
lr 1e-3 for Deepglobe and ISIC, 5e-5 for the chest X-rays and FSS-1000; ~50 steps, the
maintainer in slei109/PATNet#32; the weights trained on PASCAL restored for every episode,
#20). What the official code contains: `finetune_reference`, a KL divergence between the
query's and the supports' foreground prototypes of the first four layers under a given query
mask; test.py never calls it, `test_finetune.py` was not released (#45), and as written that
loss does not depend on the anchor layers (backbone features only; #32), so it cannot train
them. fsbench's TFI (`finetune_steps: N`, `finetune_lr`) therefore fine-tunes the three anchor
layers with the loss the paper's setting allows — the supports segmented as queries against
every support of the episode, cross-entropy against their own masks — by Adam, then predicts;
0 steps (the default) is the official test.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.methods.hsnet import HSNet
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import load_mapped_state_dict

PROTOTYPE_EPS = 1e-6  # mask_feature's and Transformation_Feature's eps
ANCHOR_CHANNELS = {"resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048),
                   "vgg16": (512, 512, 512)}  # fmt: skip


def anchor_layer(channels: int) -> nn.Linear:
    """A reference (anchor) layer as the official initialises it: Kaiming normal (fan_in,
    linear), zero bias."""
    layer = nn.Linear(channels, 2, bias=True)
    nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_in", nonlinearity="linear")
    nn.init.constant_(layer.bias, 0)
    layer.bias.requires_grad_(False)  # (only the weight is used: the bias never trains)
    return layer


class PATNet(HSNet):
    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained=None,
        blocks=None,
        freeze_backbone=True,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
    ):
        super().__init__(backbone, pretrained, blocks, freeze_backbone)
        if int(finetune_steps) < 0 or not float(finetune_lr) > 0:
            raise FsbenchError(
                f"PATNet finetune_steps {finetune_steps!r} / finetune_lr {finetune_lr!r}: "
                "steps ≥ 0 and a learning rate > 0"
            )
        first, second, third = ANCHOR_CHANNELS[backbone]
        self.reference_layer1 = anchor_layer(first)
        self.reference_layer2 = anchor_layer(second)
        self.reference_layer3 = anchor_layer(third)
        if backbone == "vgg16":  # the official indices over the 7 VGG features
            self.anchor_of = [0 if i <= 3 else 1 for i in range(7)]
        else:  # the stage of each feature (layers 2–4 of the ResNet)
            self.anchor_of = [lid - 2 for lid in self.lids if lid >= 2]
        self.finetune_steps, self.finetune_lr = int(finetune_steps), float(finetune_lr)

    def anchors(self) -> list[nn.Linear]:
        return [self.reference_layer1, self.reference_layer2, self.reference_layer3]

    def load_official_state_dict(self, state_dict) -> None:
        """A released PATNet checkpoint (`model.state_dict()` of `PATNetwork`, with or without
        DataParallel's `module.`)."""
        names = {"backbone": "backbone", "hpn_learner": "hpn_learner"}
        names.update({f"reference_layer{i}": f"reference_layer{i}" for i in (1, 2, 3)})
        load_mapped_state_dict(self, state_dict, names, "PATNet")

    def param_groups(self) -> dict[str, list]:
        groups = super().param_groups()
        groups["learner"] = groups["learner"] + [p for a in self.anchors() for p in a.parameters()]
        return groups

    def transform_pair(self, index: int, query, support, mask):
        """PATM: both sides mapped by P = (pinv(C) R)ᵀ of this layer's anchor."""
        masked = support * mask
        foreground = masked.sum((2, 3)) / (mask.sum((2, 3)) + PROTOTYPE_EPS)
        background = (support * (1 - mask)).sum((2, 3)) / ((1 - mask).sum((2, 3)) + PROTOTYPE_EPS)
        prototypes = torch.stack([background, foreground], 1)  # C: [B, 2, D]
        reference = self.anchors()[self.anchor_of[index]].weight.expand(prototypes.shape)
        reference = reference / (reference.pow(2).sum(2, keepdim=True).sqrt() + PROTOTYPE_EPS)
        prototypes = prototypes / (prototypes.pow(2).sum(2, keepdim=True).sqrt() + PROTOTYPE_EPS)
        transform = torch.matmul(torch.pinverse(prototypes), reference).permute(0, 2, 1)
        query = torch.matmul(transform, query.flatten(2)).view(query.shape)
        masked = torch.matmul(transform, masked.flatten(2)).view(masked.shape)
        return query, masked

    # -- task-adaptive fine-tuning inference ----------------------------------------------------
    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        if not self.finetune_steps:
            return super().predict(support_features, support_fg, support_bg, query_features,
                                   out_size)  # fmt: skip
        trained = copy.deepcopy([a.state_dict() for a in self.anchors()])
        try:
            self.finetune(support_features, support_fg)
            with torch.no_grad():
                return super().predict(support_features, support_fg, support_bg,
                                       query_features, out_size)  # fmt: skip
        finally:  # every episode starts from the weights trained on PASCAL
            for anchor, state in zip(self.anchors(), trained):
                anchor.load_state_dict(state)

    def finetune(self, support_features, support_fg) -> list[float]:
        """`finetune_steps` Adam steps on the anchor layers: each support segmented as a
        query against each support of its class, cross-entropy against its own mask."""
        parameters = [a.weight for a in self.anchors()]
        optimizer = torch.optim.Adam(parameters, lr=self.finetune_lr)
        way, shot = support_fg.shape[:2]
        size = support_fg.shape[-2:]
        losses = []
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                total = 0.0
                for n in range(way):
                    for q in range(shot):
                        query = tuple(f[n, q : q + 1].detach() for f in support_features)
                        target = support_fg[n, q : q + 1].long()
                        for k in range(shot):
                            logits = self.shot_logits(
                                tuple(f[n, k : k + 1].detach() for f in support_features),
                                support_fg[n, k : k + 1], query, size,
                            )  # fmt: skip
                            total = total + F.cross_entropy(logits, target)
                loss = total / (way * shot * shot)
                gradients = torch.autograd.grad(loss, parameters)
                for parameter, gradient in zip(parameters, gradients):
                    parameter.grad = gradient
                optimizer.step()
                losses.append(float(loss.detach()))
        return losses


@METHODS.register(display="PATNet")
def patnet(
    backbone: str = "resnet50",
    pretrained=None,
    blocks=None,
    freeze_backbone=True,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-3,
) -> PATNet:
    """PATNet (ECCV 2022): HSNet with pyramid anchor-based transformations of the features
    (cross-domain); backbone resnet50 | vgg16 (ImageNet: pretrained=imagenet or a path);
    finetune_steps > 0: task-adaptive fine-tuning of the anchors at test time."""
    return PATNet(backbone, pretrained, blocks, freeze_backbone, finetune_steps, finetune_lr)
