"""Layers shared by the methods: PANet's VGG-16 encoder, masked average pooling, cosine scores.
`FewShotMethod` (the method contract) lives in `methods/base.py` and is re-exported here for
plugins written against earlier versions."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.methods.base import FewShotMethod  # noqa: F401 (re-exported)
from fsbench.methods.weights import imagenet_weights_path, read_state_dict

log = logging.getLogger("fsbench")

# (convs, out channels, dilation) per VGG-16 stage; pools between them as in PANet's vgg.py.
VGG16_FILE = "vgg16-397923af.pth"
VGG16_STAGES = ((2, 64, 1), (2, 128, 1), (3, 256, 1), (3, 512, 1), (3, 512, 2))
MAP_EPS = 1e-5


def combine_binary_heads(heads: list[torch.Tensor]) -> torch.Tensor:
    """N-way logits [Q, 1+N, h, w] from N binary (bg, fg) heads of 1-way methods: class i scores
    log p_i(fg); background scores Σ_i log p_i(bg) (every head says background)."""
    if len(heads) == 1:
        return heads[0]
    log_probs = [F.log_softmax(h, 1) for h in heads]
    return torch.cat([sum(lp[:, :1] for lp in log_probs)] + [lp[:, 1:] for lp in log_probs], 1)


class VGG16Encoder(nn.Module):
    """VGG-16 conv1_1…conv5_3 as in PANet: 3×3/2 pools, pool4 stride 1, dilated conv5, stride 8."""

    def __init__(self, width: float = 1.0, pretrained: str | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for stage, (n_convs, channels, dilation) in enumerate(VGG16_STAGES):
            channels = max(1, round(channels * width))
            for index in range(n_convs):
                layers.append(
                    nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
                )
                last = stage == len(VGG16_STAGES) - 1 and index == n_convs - 1
                if not last:  # no ReLU after conv5_3
                    layers.append(nn.ReLU(inplace=True))
                in_channels = channels
            if stage < 3:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            elif stage == 3:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=1, padding=1))
        self.features = nn.Sequential(*layers)
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if pretrained:
            if width != 1:
                raise FsbenchError(f"pretrained VGG-16 weights need width=1, not width={width}")
            self.load_torchvision_vgg16(pretrained)
        else:
            log.info("VGG-16 encoder: no pretrained weights given; Kaiming-normal initialisation")
        # NHWC convolutions and pools: ~1.5x faster forward+backward on CPU, and GPU-friendly.
        self.to(memory_format=torch.channels_last)

    def load_torchvision_vgg16(self, path: str) -> None:
        """Copy the 26 conv tensors (13 weights + biases) of a torchvision VGG-16 file, in order.

        `path` "imagenet" means torchvision's vgg16-397923af.pth in $FSBENCH_WEIGHTS (default:
        <fsbench cache>/weights), so grid files need no machine-specific path."""
        file = imagenet_weights_path(VGG16_FILE) if path == "imagenet" else Path(path).expanduser()
        source = read_state_dict(
            file,
            "pretrained VGG-16 file",
            f"put torchvision's {VGG16_FILE} there (or set FSBENCH_WEIGHTS to its folder, or give "
            "its path as `pretrained`), or leave `pretrained` unset for random initialisation",
        )
        tensors = [v for k, v in source.items() if not k.startswith("classifier")][:26]
        target = self.state_dict()
        if len(tensors) < 26:
            raise FsbenchError(f"{file}: has {len(tensors)} conv tensors; a VGG-16 has 26")
        for (key, own), loaded in zip(target.items(), tensors):
            if own.shape != loaded.shape:
                raise FsbenchError(
                    f"{file}: tensor for {key} has shape {tuple(loaded.shape)}, expected "
                    f"{tuple(own.shape)}; is this a torchvision vgg16 (not vgg16_bn) state dict?"
                )
            target[key] = loaded
        self.load_state_dict(target)
        log.info("VGG-16 encoder: loaded 26 conv tensors from %s", file)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.contiguous(memory_format=torch.channels_last))


def upsample_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n_out, n_in] matrix of 1-D bilinear upsampling (align_corners=False, as F.interpolate)."""
    eye = torch.eye(n_in, device=device, dtype=dtype).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Σ up(F)·M / (Σ M + 1e-5) with up = bilinear upsampling of F [B,C,h,w] to M's size [B,H,W].

    Computed exactly through the adjoint of the upsampling, Aₕᵀ M A_w, so no C×H×W map is built.
    """
    (h, w), (H, W) = features.shape[-2:], masks.shape[-2:]
    rows = upsample_matrix(h, H, features.device, features.dtype)
    cols = upsample_matrix(w, W, features.device, features.dtype)
    weights = torch.einsum("Hh,bHW,Ww->bhw", rows, masks.to(features.dtype), cols)
    pooled = torch.einsum("bchw,bhw->bc", features, weights)
    return pooled / (masks.sum(dim=(-2, -1)).to(features.dtype)[:, None] + MAP_EPS)


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·cos(F(x,y), p_j) for features [Q,C,h,w] and prototypes [P,C] → [Q,P,h,w]."""
    return (
        torch.stack(
            [F.cosine_similarity(features, p[None, :, None, None], dim=1) for p in prototypes],
            dim=1,
        )
        * alpha
    )
