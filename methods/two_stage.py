"""What BAM and HDMNet share (chunbolang/BAM model/BAM.py, reused by Pbihao/HDMNet): the
Gram-matrix scene difference, the k-shot re-weighting, the ensemble of the meta learner with the
frozen base learner, and the method class that hands the base learner over (`init_from` or a
`base_learner:` file) and batches training episodes with their base-class labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import combine_binary_heads
from fsbench.methods.pfenet import binary_batch, load_imagenet_backbone, stride8_problem
from fsbench.methods.pspnet import (
    PSPNetBase,
    base_learner_problem,
    build_backbone,
    load_base_learner,
)

GRAM_EPS = 1e-7


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """The normalised Gram matrix [B, C, C] of [B, C, h, w] (get_gram_matrix)."""
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    norm = flat.norm(2, 2, True)
    return torch.bmm(flat, flat.transpose(1, 2)) / (
        torch.bmm(norm, norm.transpose(1, 2)) + GRAM_EPS
    )


def scene_difference(query_low, support_lows) -> torch.Tensor:
    """[B, K, 1, 1]: ‖G_q − G_s‖_F / ‖1‖_F per shot."""
    query_gram = gram_matrix(query_low)
    norm_max = torch.ones_like(query_gram).norm(dim=(1, 2))
    values = [
        ((query_gram - gram_matrix(s)).norm(dim=(1, 2)) / norm_max).reshape(-1, 1, 1, 1)
        for s in support_lows
    ]
    return torch.cat(values, 1)


def shot_weights(reweight, differences, gather_inverse: bool) -> torch.Tensor:
    """Softmax weights [B, K, 1, 1] over the shots from their sorted scene differences.
    BAM gathers the re-weights back by the inverse permutation (`weight.gather(1, idx2)`);
    HDMNet by `idx1.gather(1, idx2)` (gather_inverse False) — each as its code does."""
    if reweight is None:  # one shot: weight 1; a 1-shot model on K shots: 1/K each
        return torch.full_like(differences, 1.0 / differences.shape[1])
    sorted_values, order = differences.sort(1)
    _, inverse = order.sort(1)
    weight = reweight(sorted_values)
    index = inverse if gather_inverse else order.gather(1, inverse)
    return torch.softmax(weight.gather(1, index), 1)


def kshot_reweighting(shot: int, trans_dim: int):
    if shot <= 1:
        return None
    if trans_dim == 0:
        layer = nn.Conv2d(shot, shot, 1, bias=False)
        layer.weight = nn.Parameter(torch.ones_like(layer.weight) / shot)
        return layer
    return nn.Sequential(
        nn.Conv2d(shot, trans_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(trans_dim, shot, 1)
    )


def merge_conv() -> nn.Conv2d:
    """gram_merge / cls_merge: a 1×1 conv 2 → 1 starting as [1, 0] (the first input alone)."""
    layer = nn.Conv2d(2, 1, 1, bias=False)
    layer.weight = nn.Parameter(torch.tensor([[1.0], [0.0]]).reshape_as(layer.weight))
    return layer


def ensemble(model, meta_out, base_out, difference, cat_idx=None):
    """final_out [B, 2, h, w] of the meta and base outputs and the scene difference [B,1,1,1];
    `cat_idx` (training): each episode's base-class index, left out of the base map."""
    meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
    meta_bg, meta_fg = meta_soft[:, :1], meta_soft[:, 1:]
    if cat_idx is not None:
        channels = torch.arange(base_soft.shape[1], device=base_soft.device)
        keep = [(channels != 0) & (channels != c + 1) for c in cat_idx]
        base_map = torch.cat([base_soft[b : b + 1, k].sum(1, True) for b, k in enumerate(keep)], 0)
    else:
        base_map = base_soft[:, 1:].sum(1, True)
    est = difference.expand_as(meta_fg)
    meta_bg = model.gram_merge(torch.cat([meta_bg, est], 1))
    meta_fg = model.gram_merge(torch.cat([meta_fg, est], 1))
    merge_bg = model.cls_merge(torch.cat([meta_bg, base_map], 1))
    return torch.cat([merge_bg, meta_fg], 1)


def relu_conv(cin, cout, kernel=1, dropout=None):
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.Dropout2d(dropout)] if dropout else []))


class TwoStageMethod(FewShotMethod):
    """What BAM and HDMNet share: a frozen backbone + PSPNet base learner handed over from
    pspnet_base (`init_from`) or a `base_learner:` file, base-class labels while training, a
    model per training shot, and one binary head per class for N-way."""

    base_class_labels = True
    batched_loss = True
    model_per_shot = True

    # attributes holding the backbone and the base learner: no gradients, BatchNorm in eval
    frozen: tuple[str, ...] = ()

    def frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.frozen]

    def train(self, mode: bool = True):
        """As nn.Module.train, with the frozen backbone and base learner kept in eval mode (the
        official `freeze_modules` + `fix_bn`)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def _setup_base(self, layers, vgg, classes, blocks, pretrained):
        self.vgg, self.layers, self.classes = bool(vgg), layers, int(classes)
        self.backbone = build_backbone(layers, vgg, blocks)
        self.feature_dim = 512 if vgg else 2048
        if pretrained:
            load_imagenet_backbone(self.backbone, pretrained, layers, vgg)

    @classmethod
    def input_size_problem(cls, size: int) -> str | None:
        return stride8_problem(cls.__name__, size)

    def _setup_ensemble(self, kshot_trans_dim: int, base_learner) -> None:
        """The scene-difference ensemble's layers, the base learner's file when given, and the
        frozen parts' gradients off (the official `freeze_modules`)."""
        self.gram_merge, self.cls_merge = merge_conv(), merge_conv()
        self.kshot_rw = kshot_reweighting(self.shot, kshot_trans_dim)
        if base_learner:
            self._load_base_file(base_learner)
        for module in self.frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train(self.training)  # the frozen parts' BatchNorm in eval from the start

    @classmethod
    def kwargs_problem(cls, kwargs: dict, fold: int) -> str | None:
        path = kwargs.get("base_learner")
        return base_learner_problem(path, fold) if path else None

    def _load_base_file(self, path) -> None:
        problem = base_learner_problem(path)
        if problem:
            raise FsbenchError(problem)
        load_base_learner(self, path, self.classes, self.vgg, type(self).__name__)

    def init_from(self, model) -> None:
        """Take over a trained pspnet_base (backbone, PPM, classifier)."""
        if not isinstance(model, PSPNetBase):
            raise FsbenchError(
                f"{type(self).__name__} starts from a pspnet_base entry (init_from), not "
                f"{type(model).__name__}"
            )
        if model.classes != self.classes or model.vgg != self.vgg:
            raise FsbenchError(
                f"init_from: the pspnet_base has {model.classes} classes "
                f"({'VGG' if model.vgg else 'ResNet'}); {type(self).__name__} is built with "
                f"{self.classes} ({'VGG' if self.vgg else 'ResNet'}): give both the same kwargs"
            )
        self.load_base_learner_state(model.official_state_dict())

    def _features(self, images, image_mask=None, layer3_mask=None):
        """(layer 2 — resized to layer 3 for VGG —, 3, 4) features under no_grad (frozen)."""
        with torch.no_grad():
            x = images if image_mask is None else images * image_mask
            x = self.backbone[2](self.backbone[1](self.backbone[0](x)))
            feat2, feat3 = x, self.backbone[3](x)
            if layer3_mask is not None:
                layer3_mask = F.interpolate(
                    layer3_mask, feat3.shape[-2:], mode="bilinear", align_corners=True
                )
            feat4 = self.backbone[4](feat3 if layer3_mask is None else feat3 * layer3_mask)
            if self.vgg:
                feat2 = F.interpolate(feat2, feat3.shape[-2:], mode="bilinear", align_corners=True)
        return feat2, feat3, feat4, layer3_mask

    @staticmethod
    def _upsample(logits, size):
        h, w = size
        return F.interpolate(
            logits,
            ((h - 1) // 8 * 8 + 1, (w - 1) // 8 * 8 + 1),
            mode="bilinear",
            align_corners=True,
        )

    def forward(self, episode: Episode) -> torch.Tensor:
        """final_out [Q, 1+N, H, W] at the query labels' size (one binary head per class)."""
        queries = episode.query_images
        out_size = episode.query_labels.shape[-2:]
        heads = []
        for n in range(episode.way):
            supports = episode.support_images[n][None].expand(queries.shape[0], -1, -1, -1, -1)
            masks = episode.support_fg[n][None].expand(queries.shape[0], -1, -1, -1)
            final, _, _ = self.outputs(queries, supports, masks)
            if tuple(final.shape[-2:]) != tuple(out_size):
                final = F.interpolate(final, out_size, mode="bilinear", align_corners=True)
            heads.append(final)
        return heads[0] if len(heads) == 1 else combine_binary_heads(heads)

    def _training_batch(self, episodes: list[Episode]):
        """Queries, supports, masks, episode labels, base labels and base-class indices of the
        episodes (each class of an N-way episode a binary episode of its own)."""
        for episode in episodes:
            if episode.query_base_labels is None or not episode.base_class_ids:
                raise FsbenchError(
                    f"{type(self).__name__} trains on episodes with base-class labels (the "
                    "engine adds them for base_class_labels methods)"
                )
        query, supports, masks, target, rows = binary_batch(episodes)
        bases = torch.stack([e.query_base_labels[q] for e, _, q in rows]).long()
        cat_idx = [e.base_class_ids.index(e.class_ids[n]) for e, n, _ in rows]
        return query, supports, masks, target, bases, cat_idx

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        return self.loss_batch([episode])
