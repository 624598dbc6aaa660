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

from fsbench.datasets.episodes import Episode
from fsbench.methods.pfenet import prior_mask, weighted_gap
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

META = (
    "down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta", "cls_meta",
    "gram_merge", "cls_merge",
)  # fmt: skip


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


class BAM(TwoStageMethod):
    version = "1"
    frozen = ("backbone", "learner_base")

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
        self._setup_ensemble(kshot_trans_dim, base_learner)

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
