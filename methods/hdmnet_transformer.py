"""HDMNet's transformer (Pbihao/HDMNet model/Transformer.py and MaskMultiheadAttention.py), with
its parameter names, written in plain torch: mmseg's PatchEmbed, mmcv's ConvModule and the
shell of its MultiheadAttention become the few layers they are; SyncBatchNorm is BatchNorm2d
(one process). Compared with the official blocks run under mmcv 1.7.2 + mmsegmentation 0.30.0
in tests/test_parity_bam.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


def to_tokens(x):
    return x.flatten(2).transpose(1, 2)


def to_map(x, hw):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


class PatchEmbed(nn.Module):
    """mmseg's PatchEmbed: conv projection, tokens, LayerNorm."""

    def __init__(self, dim, kernel, stride):
        super().__init__()
        self.projection = nn.Conv2d(dim, dim, kernel, stride, padding=stride // 2)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x):
        x = self.projection(x)
        return self.norm(to_tokens(x)), tuple(x.shape[-2:])


class MaskMultiHeadAttention(nn.Module):
    """HDMNet's attention: q/k/v/o linear layers without bias; self-attention scaled by
    √d + 1e-9; cross-attention on cosine / 0.1, softmax over the queries, masked by the
    support mask, with each query's mean masked score as its weight (for distillation)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.linear_q = nn.Linear(dim, dim, bias=False)
        self.linear_k = nn.Linear(dim, dim, bias=False)
        self.linear_v = nn.Linear(dim, dim, bias=False)
        self.linear_o = nn.Linear(dim, dim, bias=False)

    def _split(self, x):
        b, n, c = x.shape
        return (
            x.reshape(b, n, self.heads, c // self.heads)
            .permute(0, 2, 1, 3)
            .reshape(b * self.heads, n, -1)
        )

    def forward(self, q, k, v, mask=None, cross=False):
        q, k, v = (
            self._split(f(x))
            for f, x in ((self.linear_q, q), (self.linear_k, k), (self.linear_v, v))
        )
        if cross:
            mask = mask.repeat_interleave(self.heads, 0)
            scores = (
                torch.einsum("bmc,bnc->bmn", F.normalize(q, dim=2), F.normalize(k, dim=2)) / 0.1
            )
            attention = F.softmax(scores, dim=-2).masked_fill(mask == 0, 0)
            weight = (scores * mask).sum(2) / (mask.sum(2) + 1e-9)
        else:
            scores = torch.einsum("bmc,bnc->bmn", q, k) / (math.sqrt(q.shape[-1]) + 1e-9)
            attention = F.softmax(scores, dim=-1)
            weight = scores.mean(2)
        if self.heads > 1:
            weight = weight.reshape(weight.shape[0] // self.heads, self.heads, -1).mean(1)
        y = attention.matmul(v)
        bh, n, c = y.shape
        y = (
            y.reshape(bh // self.heads, self.heads, n, c)
            .permute(0, 2, 1, 3)
            .reshape(bh // self.heads, n, -1)
        )
        return self.linear_o(y), weight


class EfficientAttention(nn.Module):
    """EfficientMultiheadAttention: keys/values spatially reduced (sr conv + LayerNorm)."""

    def __init__(self, dim, heads, drop, sr_ratio):
        super().__init__()
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MaskMultiHeadAttention(dim, heads)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x, hw, source=None, identity=None, mask=None, cross=False):
        kv = x if source is None else source
        if self.sr_ratio > 1:
            kv = self.norm(to_tokens(self.sr(to_map(kv, hw))))
        out, weight = self.attn(x, kv, kv, mask=mask, cross=cross)
        return (x if identity is None else identity) + self.proj_drop(out), weight


class MixFFN(nn.Module):
    def __init__(self, dim, hidden, drop):
        super().__init__()
        dropout = nn.Dropout(drop)
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(), dropout, nn.Conv2d(hidden, dim, 1), dropout,
        )  # fmt: skip

    def forward(self, x, hw, identity):
        return identity + to_tokens(self.layers(to_map(x, hw)))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, drop=0.1, sr_ratio=1, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientAttention(dim, heads, drop, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, mlp_ratio * dim, drop)

    def forward(self, x, hw, source=None, mask=None, cross=False):
        if source is None:
            x, weight = self.attn(self.norm1(x), hw, identity=x)
        else:
            x, weight = self.attn(
                self.norm1(x), hw, source=self.norm1(source), identity=x, mask=mask, cross=cross
            )
        return self.ffn(self.norm2(x), hw, identity=x), weight


class ConvModule(nn.Module):
    """mmcv's ConvModule(conv without bias, BatchNorm, ReLU)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def _parse(dim, out=None, relu=True):
    layers = [
        nn.Conv2d(dim, dim * 4, 1), nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, dim * 4, 3, padding=1), nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, out or dim, 1),
    ]  # fmt: skip
    return nn.Sequential(*layers, *([nn.BatchNorm2d(dim), nn.ReLU()] if relu else []))


class MixVisionTransformer(nn.Module):
    def __init__(self, dim=64, heads=(2, 4, 8), match_heads=2, patch=(1, 3, 3),
                 stride=(1, 2, 2), sr=(4, 2, 1), similarity_channels=2, drop=0.1):  # fmt: skip
        super().__init__()
        self.down_sample_layers = nn.ModuleList(
            nn.ModuleList([
                PatchEmbed(dim, patch[i], stride[i]),
                EncoderLayer(dim, heads[i], drop, sr[i]),
                EncoderLayer(dim, heads[i], drop, sr[i]),
                nn.LayerNorm(dim, eps=LN_EPS),
            ])
            for i in range(3)
        )  # fmt: skip
        self.match_layers = nn.ModuleList(
            nn.ModuleList(
                [
                    EncoderLayer(dim, match_heads, drop, 1),
                    ConvModule(dim + similarity_channels, dim),
                ]
            )
            for _ in range(3)
        )
        self.parse_layers = nn.ModuleList(_parse(dim) for _ in range(3))
        self.cls = _parse(dim, out=2, relu=False)

    def forward(self, q_x, s_x, mask, similarity):
        # the shots of the supports given (the official's `self.shot`; its layers do not depend
        # on it, so a model scores any K)
        shot = s_x.shape[0] // q_x.shape[0]
        queries, supports, shapes, masks, similarities = [], [], [], [], []
        for i, layer in enumerate(self.down_sample_layers):
            q_x, q_hw = layer[0](q_x)
            s_x, s_hw = layer[0](s_x)
            q_x, s_x = layer[1](q_x, q_hw)[0], layer[1](s_x, s_hw)[0]
            q_x, s_x = layer[2](q_x, q_hw)[0], layer[2](s_x, s_hw)[0]
            q_x, s_x = layer[3](q_x), layer[3](s_x)
            down = F.interpolate(mask, s_hw, mode="nearest")  # [(b n), 1, h, w]
            down = down.reshape(-1, shot, 1, *s_hw).permute(0, 2, 1, 3, 4).flatten(2)
            masks.append(down.repeat(1, q_hw[0] * q_hw[1], 1))
            similarities.append(
                F.interpolate(similarity, q_hw, mode="bilinear", align_corners=True)
            )
            queries.append(q_x)
            supports.append(s_x.reshape(-1, shot * s_x.shape[1], s_x.shape[2]))
            shapes.append(q_hw)
            if i != len(self.down_sample_layers) - 1:
                q_x, s_x = to_map(q_x, q_hw), to_map(s_x, s_hw)
        outs, weights = None, []
        for i in reversed(range(len(self.down_sample_layers))):
            attend, conv = self.match_layers[i]
            out, weight = attend(
                queries[i], shapes[i], source=supports[i], mask=masks[i], cross=True
            )
            out = to_map(out, shapes[i])
            weights.append(weight.view(out.shape[0], *shapes[i]))
            out = conv(torch.cat([out, similarities[i]], 1))
            if outs is None:
                outs = self.parse_layers[i](out)
            else:
                outs = F.interpolate(outs, out.shape[-2:], mode="bilinear", align_corners=False)
                outs = outs + self.parse_layers[i](out + outs)
        return self.cls(outs), weights


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix_transformer = MixVisionTransformer()

    def forward(self, features, support_features, mask, similarity):
        return self.mix_transformer(features, support_features, mask, similarity)
