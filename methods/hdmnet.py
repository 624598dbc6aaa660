"""HDMNet (Peng et al., CVPR 2023): hierarchical dense correlation distillation, on BAM's base.

The network of Pbihao/HDMNet model/HDMNet.py, Transformer.py and MaskMultiheadAttention.py with
their parameter names, so its released checkpoints load (`load_official_state_dict`) and give
its outputs (tests/test_parity_bam.py, fixtures recorded from the official code). Its
transformer blocks import mmcv 1.x and mmseg 0.x (PatchEmbed, ConvModule, MultiheadAttention's
shell, SyncBatchNorm); they are written here in plain torch instead of making mmcv a dependency:
mmcv 1.x needs a compiled extension for its `ops` import path, has no wheels for current torch
and Python, and its 2.x API dropped `mmcv.runner`; the blocks use nothing but convolutions,
LayerNorm, linear attention layers and interpolation, compared tensor for tensor with the
official ones (run with mmcv 1.7.2 + mmsegmentation 0.30.0) in the parity fixtures.
SyncBatchNorm is BatchNorm2d here: one process computes the same thing, and the official
training keeps every BatchNorm in eval mode anyway (`fix_bn`).

- Frozen backbone and PSPNet (ppm, cls[:2] → 512-d "layer 5", base learner cls[2:]) handed over
  from pspnet_base (`init_from`) or a `base_learner:` file; supports pass the backbone as the
  image times its mask (nearest).
- Similarities (max cosine, no normalisation) of the masked support layer-4 and layer-5
  features to the query's, averaged over shots; query_merge(down_query ‖ prototype ‖ 10·sim),
  supp_merge(down_supp ‖ prototype).
- MixVisionTransformer: 3 down stages (PatchEmbed 1/3/3 px stride 1/2/2, two self-attention
  layers with spatial reduction 4/2/1 and Mix-FFN, LayerNorm eps 1e-6), then coarse-to-fine
  masked cross-attention matching (cosine / 0.1, softmax over the query positions, masked by
  the support mask; its per-query weights are distilled level to level), ConvModule with the
  similarity, parse layers, classifier.
- BAM's scene-difference ensemble with the frozen base learner (k shots: `kshot_rw`, which
  HDMNet's optimiser leaves out: it keeps its initial weights).
Training: CE(final) + CE(meta) + KL distillation / 3 + CE(base), AdamW (transformer at lr, the
rest at 10·lr by poly_learning_rate's index_split 0), every BatchNorm in eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.datasets.episodes import Episode
from fsbench.methods.hdmnet_transformer import Transformer
from fsbench.methods.pfenet import weighted_gap
from fsbench.methods.pspnet import BINS, PPM, backbone_names, psp_classifier
from fsbench.methods.registry import METHODS
from fsbench.methods.two_stage import (
    TwoStageMethod,
    ensemble,
    relu_conv,
    scene_difference,
    shot_weights,
)
from fsbench.methods.weights import load_mapped_state_dict

META = ("down_supp", "down_query", "query_merge", "supp_merge", "gram_merge", "cls_merge")


def similarity_map(query, support, mask):
    """get_similarity: per query position the largest cosine to the masked support features
    (mask resized by nearest), not normalised: [B, 1, h, w]."""
    mask = F.interpolate((mask == 1).float(), query.shape[-2:])
    b, c, h, w = query.shape
    q = query.reshape(b, c, -1)
    s = (support * mask).reshape(b, c, -1).permute(0, 2, 1)
    similarity = torch.bmm(s, q) / (torch.bmm(s.norm(2, 2, True), q.norm(2, 1, True)) + 1e-7)
    return similarity.max(1)[0].view(b, 1, h, w)


def distillation(teacher, student):
    """KL(softmax teacher ‖ softmax student) over the positions (disstil_loss)."""
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher[:, None], student.shape[-2:], mode="bilinear")[:, 0]
    t, s = teacher.flatten(1).softmax(1), student.flatten(1).softmax(1)
    return (t * torch.log(t + 1e-12) - t * torch.log(s + 1e-12)).sum(1).mean()


class HDMNet(TwoStageMethod):
    version = "1"
    frozen = ("backbone", "ppm", "cls", "base_learnear")

    def __init__(self, layers=50, vgg=False, classes=16, shot=1, kshot_trans_dim=2,
                 base_learner=None, pretrained=None, blocks=None):  # fmt: skip
        super().__init__()
        self._setup_base(layers, vgg, classes, blocks, pretrained)
        self.shot = int(shot)
        dim = self.feature_dim
        self.ppm = PPM(dim, dim // len(BINS))
        head = psp_classifier(dim, self.classes)
        self.cls = nn.Sequential(head[0], head[1])
        self.base_learnear = nn.Sequential(head[2], head[3], head[4])  # (sic: the official name)
        feat_dim = (512 + 256) if vgg else (1024 + 512)
        self.down_supp = relu_conv(feat_dim, 256, 1, 0.5)
        self.down_query = relu_conv(feat_dim, 256, 1, 0.5)
        self.query_merge = relu_conv(512 + 2, 64)
        self.supp_merge = relu_conv(512, 64)
        self.transformer = Transformer()  # any K: the official's shot sets no weight
        self._setup_ensemble(kshot_trans_dim, base_learner)

    @classmethod
    def default_stages(cls):
        return ({"name": "meta", "params": ["transformer", "meta"]},)

    def param_groups(self) -> dict[str, list]:
        return {
            "backbone": list(self.backbone.parameters()),
            "base": [
                *self.ppm.parameters(),
                *self.cls.parameters(),
                *self.base_learnear.parameters(),
            ],
            "transformer": list(self.transformer.parameters()),
            "meta": [p for name in META for p in getattr(self, name).parameters()],
            # not in HDMNet's optimiser: its k-shot re-weighting keeps its initial weights
            "kshot": list(self.kshot_rw.parameters()) if self.kshot_rw is not None else [],
        }

    def load_official_state_dict(self, state_dict) -> None:
        names = {n: n for n in (*META, "ppm", "cls", "base_learnear", "transformer", "kshot_rw")}
        load_mapped_state_dict(self, state_dict, {**names, **backbone_names()}, "HDMNet")

    def load_base_learner_state(self, state_dict) -> None:
        names = {**backbone_names(), "ppm": "ppm", "cls.0": "cls.0", "cls.1": "cls.1"}
        names.update({f"cls.{i}": f"base_learnear.{i - 2}" for i in (2, 3, 4)})
        optional = tuple(n + "." for n in (*META, "transformer", "kshot_rw"))
        load_mapped_state_dict(self, state_dict, names, "PSPNet", optional=optional)

    def _extract(self, images, mask=None):
        """(layer 2, 3, 4, 5) features, no gradients; supports are image × mask (nearest)."""
        if mask is not None:
            mask = F.interpolate(mask, size=images.shape[-2], mode="nearest")
        feat2, feat3, feat4, _ = self._features(images, image_mask=mask)
        with torch.no_grad():
            feat5 = self.cls(self.ppm(feat4))
        return feat2, feat3, feat4, feat5

    def outputs(self, query, supports, masks, cat_idx=None, with_weights=False):
        b, shot = supports.shape[:2]
        q2, q3, q4, q5 = self._extract(query)
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        mask = (masks.flatten(0, 1)[:, None] == 1).float()
        s2, s3, s4, s5 = self._extract(supports.flatten(0, 1), mask)
        supp_feat = self.down_supp(torch.cat([s3, s2], 1))
        prototype = weighted_gap(
            supp_feat, F.interpolate(mask, s3.shape[-2:], mode="bilinear", align_corners=True)
        )
        prototype = prototype.repeat(1, 1, *supp_feat.shape[-2:])
        lows = list(s2.unflatten(0, (b, shot)).unbind(1))
        s4, s5, m = (t.unflatten(0, (b, shot)) for t in (s4, s5, mask))
        similarity = torch.cat(
            [
                torch.stack([similarity_map(q5, s5[:, k], m[:, k]) for k in range(shot)], 1).mean(
                    1
                ),
                torch.stack([similarity_map(q4, s4[:, k], m[:, k]) for k in range(shot)], 1).mean(
                    1
                ),
            ],
            1,
        )
        supp_feat = self.supp_merge(torch.cat([supp_feat, prototype], 1))
        prototype = prototype.unflatten(0, (b, shot)).mean(1)
        query_feat = self.query_merge(torch.cat([query_feat, prototype, similarity * 10], 1))
        meta_out, weights = self.transformer(query_feat, supp_feat, mask, similarity)
        base_out = self.base_learnear(q5)
        differences = scene_difference(q2, lows)
        shot_weight = shot_weights(self.kshot_rw, differences, gather_inverse=False)
        difference = (shot_weight * differences).sum(1, True)
        final_out = ensemble(self, meta_out, base_out, difference, cat_idx)
        size = query.shape[-2:]
        out = tuple(
            F.interpolate(o, size, mode="bilinear", align_corners=True)
            for o in (final_out, meta_out, base_out)
        )
        return (*out, weights) if with_weights else out

    def loss_batch(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """train.py's loss: CE(final) + CE(meta) + distillation / 3 + CE(base)."""
        query, supports, masks, target, base_target, cat_idx = self._training_batch(episodes)
        final, meta, base, weights = self.outputs(
            query, supports, masks, cat_idx, with_weights=True
        )
        main = F.cross_entropy(final, target, ignore_index=255)
        aux_meta = F.cross_entropy(meta, target, ignore_index=255)
        aux_base = F.cross_entropy(base, base_target, ignore_index=255)
        teacher = (target == 1).float().masked_fill(target != 1, -1e9)
        distil = 0
        for weight in weights:
            distil = distil + distillation(teacher, weight)
            teacher = weight.detach()
        distil = distil / 3
        total = main + aux_meta + distil + aux_base
        return {"main": main, "meta": aux_meta, "distil": distil, "base": aux_base, "total": total}


@METHODS.register(display="HDMNet")
def hdmnet(
    layers: int = 50, vgg: bool = False, classes: int = 16, shot: int = 1,
    kshot_trans_dim: int = 2, base_learner=None, pretrained=None, blocks=None,
) -> HDMNet:  # fmt: skip
    """HDMNet (CVPR 2023): BAM's frozen base learner + a hierarchical transformer matcher with
    correlation distillation (init_from a pspnet_base entry, or its best.pth as base_learner).
    classes = 1 + base classes (PASCAL-5i 16, COCO-20i 61); shot: the model's training shot."""
    return HDMNet(layers, vgg, classes, shot, kshot_trans_dim, base_learner, pretrained, blocks)
