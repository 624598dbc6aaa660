"""BAM (Lang et al., CVPR 2022): base and meta learners, ensembled by the scene difference.

The network of chunbolang/BAM model/BAM.py (`OneModel(args, cls_type='Base')`) with its
parameter names, so its released checkpoints (`{'epoch', 'state_dict', 'optimizer'}`, `module.`
under DDP) load (`load_official_state_dict`) and give its outputs (tests/test_parity_bam.py,
fixtures recorded from the official code):
- backbone layer0…layer4 and the base learner (`learner_base` = PSPNet's PPM + classifier) come
  from a trained PSPNet (pspnet_base: an `init_from:` entry, or BAM's `best.pth` file as
  `base_learner:`) and stay frozen;
- meta learner: PFENet's reduced layer-3 ‖ layer-2 features, the prior (masked support layer 4,
  max cosine, min-max normalised) and the Weighted_GAP prototype, merged (init_merge), ASPP,
  res1/res2 and a 2-class classifier (`cls_meta`);
- scene difference: ‖G_q − G_s‖_F / ‖1‖_F of the Gram matrices of the layer-2 features (K
  shots: `kshot_rw` weights over the sorted differences, softmax; 1 shot: weight 1);
- ensemble: final = [cls_merge(gram_merge(meta_bg, ψ), Σ_{c≥1} softmax(base)_c),
  gram_merge(meta_fg, ψ)], outputs upsampled ×8 (align_corners=True). While training, the base
  map leaves out the episode class's own channel (`cls_type='Base'`).
Training (train.py): cross-entropy (void 255) of final and meta outputs against the episode
label plus the base output against the base-class label; backbone and base learner frozen with
their BatchNorm in eval (`fix_bn`).

The k-shot reweighting exists only in a model built for K > 1 shots (`shot`: fsbench passes the
model's training shot). A 1-shot model scored on K shots weighs the shots equally (the official
1-shot model cannot take K shots; this is fsbench's extension, as PFENet's mean over shots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import combine_binary_heads
from fsbench.methods.pfenet import COSINE_EPS, load_imagenet_backbone, prior_mask, weighted_gap
from fsbench.methods.pspnet import (
    BINS,
    PPM,
    PSPNetBase,
    backbone_names,
    base_learner_problem,
    build_backbone,
    load_base_learner,
    psp_classifier,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import load_mapped_state_dict

GRAM_EPS = 1e-7
META = (
    "down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta", "cls_meta",
    "gram_merge", "cls_merge",
)  # fmt: skip


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


class ASPP(nn.Module):
    """BAM's ASPP: image pooling branch + 1×1 + three dilated 3×3 (6, 12, 18), with bias."""

    def __init__(self, dim: int = 256):
        super().__init__()

        def branch(kernel, dilation):
            pad = 0 if kernel == 1 else dilation
            return nn.Sequential(
                nn.Conv2d(dim, dim, kernel, padding=pad, dilation=dilation), nn.ReLU()
            )

        self.layer6_0, self.layer6_1 = branch(1, 1), branch(1, 1)
        self.layer6_2, self.layer6_3, self.layer6_4 = branch(3, 6), branch(3, 12), branch(3, 18)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, *size)
        return torch.cat(
            [pooled, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1
        )


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

    def frozen_modules(self) -> list[nn.Module]:
        """The backbone and the base learner: no gradients, BatchNorm always in eval."""
        raise NotImplementedError

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
        if (size - 1) % 8 == 0:
            return None
        below = size - (size - 1) % 8
        return f"{cls.__name__} needs (S − 1) % 8 == 0; nearest input sizes: {below} or {below + 8}"

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
        queries, supports, masks, targets, bases, cat_idx = [], [], [], [], [], []
        for episode in episodes:
            if episode.query_base_labels is None or not episode.base_class_ids:
                raise FsbenchError(
                    f"{type(self).__name__} trains on episodes with base-class labels (the "
                    "engine adds them for base_class_labels methods)"
                )
            for n, class_id in enumerate(episode.class_ids):
                labels = episode.query_labels
                target = torch.where(labels == n + 1, 1, torch.where(labels == 255, 255, 0))
                index = episode.base_class_ids.index(class_id)
                for q in range(labels.shape[0]):
                    queries.append(episode.query_images[q])
                    supports.append(episode.support_images[n])
                    masks.append(episode.support_fg[n])
                    targets.append(target[q])
                    bases.append(episode.query_base_labels[q])
                    cat_idx.append(index)
        return (
            torch.stack(queries), torch.stack(supports), torch.stack(masks),
            torch.stack(targets).long(), torch.stack(bases).long(), cat_idx,
        )  # fmt: skip

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        return self.loss_batch([episode])


class BAM(TwoStageMethod):
    version = "1"

    def __init__(
        self, layers=50, vgg=False, classes=16, shot=1, kshot_trans_dim=2, base_learner=None,
        pretrained=None, blocks=None, reduce_dim=256,
    ):  # fmt: skip
        super().__init__()
        self._setup_base(layers, vgg, classes, blocks, pretrained)
        self.shot = int(shot)
        self.learner_base = nn.Sequential(
            PPM(self.feature_dim, self.feature_dim // len(BINS)),
            psp_classifier(self.feature_dim, self.classes),
        )
        dim, feat_dim = reduce_dim, (512 + 256) if vgg else (1024 + 512)
        self.down_query = relu_conv(feat_dim, dim, 1, 0.5)
        self.down_supp = relu_conv(feat_dim, dim, 1, 0.5)
        self.init_merge = relu_conv(dim * 2 + 1, dim)
        self.ASPP_meta = ASPP(dim)
        self.res1_meta = relu_conv(dim * 5, dim)
        self.res2_meta = nn.Sequential(*relu_conv(dim, dim, 3), *relu_conv(dim, dim, 3))
        self.cls_meta = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(dim, 2, 1),
        )  # fmt: skip
        self.gram_merge, self.cls_merge = merge_conv(), merge_conv()
        self.kshot_rw = kshot_reweighting(self.shot, kshot_trans_dim)
        if base_learner:
            self._load_base_file(base_learner)
        for module in self.frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone, self.learner_base]

    @classmethod
    def default_stages(cls):
        # the meta stage; the base learner comes trained (init_from / base_learner)
        return ({"name": "meta", "params": ["meta"]},)

    def param_groups(self) -> dict[str, list]:
        meta = [p for name in META for p in getattr(self, name).parameters()]
        if self.kshot_rw is not None:
            meta += list(self.kshot_rw.parameters())
        return {
            "backbone": list(self.backbone.parameters()),
            "base": list(self.learner_base.parameters()),
            "meta": meta,
        }

    def _official_names(self) -> dict[str, str]:
        names = {name: name for name in (*META, "learner_base", "kshot_rw")}
        return {**names, **backbone_names()}

    def load_official_state_dict(self, state_dict) -> None:
        """A BAM checkpoint (train.py's `{'state_dict': …}`, `module.` or not): every tensor,
        the frozen backbone and base learner included."""
        load_mapped_state_dict(self, state_dict, self._official_names(), "BAM")

    def load_base_learner_state(self, state_dict) -> None:
        """A PSPNet state dict (pspnet_base's or BAM's `best.pth`) into backbone + learner_base."""
        names = {**backbone_names(), "ppm": "learner_base.0", "cls": "learner_base.1"}
        load_mapped_state_dict(
            self, state_dict, names, "PSPNet", optional=tuple(n + "." for n in (*META, "kshot_rw"))
        )

    def outputs(self, query, supports, masks, cat_idx=None):
        """(final_out, meta_out, base_out) at the input size, as the official eval forward,
        for queries [B, 3, S, S], supports [B, K, 3, S, S], masks [B, K, S, S] (0/1)."""
        q2, q3, q4, _ = self._features(query)
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        prototypes, priors, lows = [], [], []
        for k in range(supports.shape[1]):
            full = masks[:, k : k + 1].float()
            s2, s3, s4, mask = self._features(supports[:, k], layer3_mask=full)
            supp = self.down_supp(torch.cat([s3, s2], 1))
            prototypes.append(weighted_gap(supp, mask))
            lows.append(s2)
            prior = prior_mask(q4, s4, full)
            priors.append(F.interpolate(prior, q3.shape[-2:], mode="bilinear", align_corners=True))
        differences = scene_difference(q2, lows)
        weights = shot_weights(self.kshot_rw, differences, gather_inverse=True)
        difference = (weights * differences).sum(1, True)
        prior = (weights * torch.cat(priors, 1)).sum(1, True)
        prototype = (weights.permute(0, 2, 1, 3) * torch.cat(prototypes, 2)).sum(2, True)
        merged = self.init_merge(torch.cat([query_feat, prototype.expand_as(query_feat), prior], 1))
        base_out = self.learner_base(q4)
        meta = self.res1_meta(self.ASPP_meta(merged))
        meta = self.res2_meta(meta) + meta
        meta_out = self.cls_meta(meta)
        final_out = ensemble(self, meta_out, base_out, difference, cat_idx)
        size = query.shape[-2:]
        return (
            self._upsample(final_out, size),
            self._upsample(meta_out, size),
            self._upsample(base_out, size),
        )

    def loss_batch(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """train.py's loss: CE(final) + CE(meta) + CE(base, base labels), void 255 ignored."""
        query, supports, masks, target, base_target, cat_idx = self._training_batch(episodes)
        final, meta, base = self.outputs(query, supports, masks, cat_idx)
        main = F.cross_entropy(final, target, ignore_index=255)
        aux_meta = F.cross_entropy(meta, target, ignore_index=255)
        aux_base = F.cross_entropy(base, base_target, ignore_index=255)
        return {
            "main": main,
            "meta": aux_meta,
            "base": aux_base,
            "total": main + aux_meta + aux_base,
        }


@METHODS.register(display="BAM")
def bam(
    layers: int = 50, vgg: bool = False, classes: int = 16, shot: int = 1,
    kshot_trans_dim: int = 2, base_learner=None, pretrained=None, blocks=None,
    reduce_dim: int = 256,
) -> BAM:  # fmt: skip
    """BAM (CVPR 2022): a frozen PSPNet base learner (init_from a pspnet_base entry, or its
    best.pth as base_learner) ensembled with a PFENet-like meta learner by the scene difference.
    classes = 1 + base classes (PASCAL-5i 16, COCO-20i 61); shot: the model's training shot."""
    return BAM(
        layers, vgg, classes, shot, kshot_trans_dim, base_learner, pretrained, blocks, reduce_dim
    )


__all__ = [
    "BAM",
    "COSINE_EPS",
    "TwoStageMethod",
    "bam",
    "ensemble",
    "scene_difference",
    "shot_weights",
]
