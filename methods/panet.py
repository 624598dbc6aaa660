"""PANet (Wang et al., ICCV 2019): prototype alignment network, as its paper and official code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import (
    VGG16Encoder,
    cosine_scores,
    masked_average_pool,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.weights import load_mapped_state_dict

COSINE_EPS = 1e-8  # F.cosine_similarity's default


class PANet(FewShotMethod):
    """Metric learning on masked-average-pooled prototypes, with PAR during training."""

    cacheable_encoder = True
    support_states = True  # per-support fg/bg prototypes: a few KB each

    def __init__(self, alpha=20.0, par_weight=1.0, width=1.0, pretrained=None):
        super().__init__()
        if alpha <= 0 or par_weight < 0 or width <= 0:
            raise FsbenchError(
                "PANet needs alpha > 0, par_weight ≥ 0, width > 0 "
                f"(got {alpha}, {par_weight}, {width})"
            )
        self.alpha = float(alpha)
        self.par_weight = float(par_weight)
        self.encoder = VGG16Encoder(width=width, pretrained=pretrained)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def load_official_state_dict(self, state_dict) -> None:
        """Weights saved from the official FewShotSeg (kaixin96/PANet: `model.state_dict()`, with
        or without DataParallel's `module.`): its 13 VGG convs, stage by stage."""
        official = [  # models/vgg.py: features = [stage, pool, stage, pool, …], convs at 0, 2, 4
            f"encoder.backbone.features.{2 * stage}.{2 * index}.{kind}"
            for stage, n_convs in enumerate((2, 2, 3, 3, 3))
            for index in range(n_convs)
            for kind in ("weight", "bias")
        ]
        names = dict(zip(official, self.state_dict()))
        load_mapped_state_dict(self, state_dict, names, "PANet")

    @staticmethod
    def prototypes(support_features, support_fg, support_bg):
        """Foreground prototype per way (mean over shots); background: mean over all supports."""
        way, shot = support_fg.shape[:2]
        flat = support_features.flatten(0, 1)
        fg = masked_average_pool(flat, support_fg.flatten(0, 1)).view(way, shot, -1)
        bg = masked_average_pool(flat, support_bg.flatten(0, 1)).view(way, shot, -1)
        return fg.mean(1), bg.mean((0, 1))

    def scores(self, support_features, support_fg, support_bg, query_features):
        """Low-resolution scores [Q, 1+N, h, w] of the queries against [bg, class 1…N]."""
        fg, bg = self.prototypes(support_features, support_fg, support_bg)
        return cosine_scores(query_features, torch.cat([bg[None], fg]), self.alpha)

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        """Logits at `out_size` from encoded supports [N,K,C,h,w] and queries [Q,C,h,w]."""
        return self.predict_batch(
            support_features[None],
            support_fg[None],
            support_bg[None],
            query_features[None],
            out_size,
        )[0]

    def predict_batch(self, support_features, support_fg, support_bg, query_features, out_size):
        """Logits [B,Q,1+N,H,W] of B episodes in one pass: all supports pooled in one call, all
        queries scored against their own episode's prototypes, one upsampling."""
        batch, way, shot = support_fg.shape[:3]
        pooled = self.support_state(
            support_features.flatten(0, 2), support_fg.flatten(0, 2), support_bg.flatten(0, 2)
        ).unflatten(0, (batch, way, shot))  # [B, N, K, 2, C]
        queries = query_features.shape[1]
        pooled = pooled[:, None].expand(batch, queries, *pooled.shape[1:]).flatten(0, 1)
        logits = self.predict_states(query_features.flatten(0, 1), pooled[:, None], out_size)
        return logits.unflatten(0, (batch, queries))[:, :, 0]

    def support_state(self, features, fg, bg):
        """Per-support foreground and background prototypes [n, 2, C] of features [n,C,h,w] under
        masks [n,H,W]: everything an episode needs from a support image, a few KB."""
        return torch.stack(
            [masked_average_pool(features, fg), masked_average_pool(features, bg)], 1
        )

    def predict_states(self, query_features, pooled, out_size):
        """Logits [Q, R, 1+N, H, W] of each query [Q,C,h,w] against R episodes' pooled supports
        [Q, R, N, K, 2, C]: class prototypes are the mean over shots, the background the mean
        over all supports (PANet's rule)."""
        fg, bg = pooled[..., 0, :], pooled[..., 1, :]  # [Q, R, N, K, C]
        prototypes = torch.cat([bg.mean((-3, -2))[..., None, :], fg.mean(-2)], -2)
        # cos = q·p / sqrt(max(|q|²·|p|², eps²)), F.cosine_similarity's formula, with the dot
        # products as one batched matmul (its broadcast form materialises Q·P·C·h·w products).
        dots = torch.einsum("qchw,qrpc->qrphw", query_features, prototypes)
        norms = (
            query_features.pow(2).sum(1)[:, None, None] * prototypes.pow(2).sum(-1)[..., None, None]
        )
        low = dots / norms.clamp_min(COSINE_EPS**2).sqrt() * self.alpha  # [Q, R, 1+N, h, w]
        # channels-last in, channels-last out: the class argmax then reduces a contiguous axis.
        logits = F.interpolate(
            low.flatten(0, 1).contiguous(memory_format=torch.channels_last),
            size=out_size,
            mode="bilinear",
            align_corners=False,
        )
        return logits.unflatten(0, low.shape[:2])

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        if not self.trainable:
            return super().loss(episode)
        support_features, query_features = self.encode_episode(episode)
        low = self.scores(support_features, episode.support_fg, episode.support_bg, query_features)
        logits = F.interpolate(
            low, size=episode.query_labels.shape[-2:], mode="bilinear", align_corners=False
        )
        losses = {"segmentation": F.cross_entropy(logits, episode.query_labels, ignore_index=255)}
        if self.par_weight > 0:
            losses["par"] = self.alignment_loss(
                query_features, low, support_features, episode.support_fg, episode.support_bg
            )
        losses["total"] = losses["segmentation"] + self.par_weight * losses.get("par", 0.0)
        return losses

    def alignment_loss(
        self, query_features, query_scores, support_features, support_fg, support_bg
    ):
        """PAR: segment the supports with prototypes taken from the query's own prediction."""
        way, shot = support_fg.shape[:2]
        # The argmax mask carries no gradient; the query features it pools do.
        predicted = (
            F.one_hot(query_scores.argmax(1), way + 1).permute(0, 3, 1, 2).to(query_features)
        )
        area = predicted.sum(dim=(0, 2, 3))
        query_prototypes = torch.einsum("qchw,qkhw->kc", query_features, predicted) / (
            area[:, None] + 1e-5
        )
        loss = query_features.new_zeros(())
        for index in range(way):
            if area[index + 1] == 0:  # the query prediction lacks this class: skip it
                continue
            prototypes = query_prototypes[[0, index + 1]]
            labels = torch.full_like(support_fg[index], 255, dtype=torch.long)
            labels[support_fg[index] == 1] = 1
            labels[support_bg[index] == 1] = 0
            scores = cosine_scores(support_features[index], prototypes, self.alpha)
            logits = F.interpolate(
                scores, size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            for k in range(shot):  # per-shot mean, then / shots / ways, as the official code
                if (labels[k] != 255).any():
                    loss = (
                        loss
                        + F.cross_entropy(logits[k : k + 1], labels[k : k + 1], ignore_index=255)
                        / shot
                        / way
                    )
        return loss


class UntrainedPANet(PANet):
    """PANet's prototypes and scores on the encoder as built: evaluated without training."""

    trainable = False


@METHODS.register(display="PANet")
def panet(alpha=20.0, par_weight=1.0, width=1.0, pretrained=None) -> PANet:
    """PANet with prototype alignment regularisation (the paper's full model)."""
    return PANet(alpha=alpha, par_weight=par_weight, width=width, pretrained=pretrained)


@METHODS.register(display="PANet w/o PAR")
def panet_nopar(alpha=20.0, width=1.0, pretrained=None) -> PANet:
    """PANet without PAR (the paper's ablation)."""
    return PANet(alpha=alpha, par_weight=0.0, width=width, pretrained=pretrained)


@METHODS.register(display="PANet, untrained")
def prototype_notrain(alpha=20.0, width=1.0, pretrained=None) -> UntrainedPANet:
    """PANet's test-time computation on an untrained (or ImageNet-only) encoder."""
    return UntrainedPANet(alpha=alpha, par_weight=0.0, width=width, pretrained=pretrained)
