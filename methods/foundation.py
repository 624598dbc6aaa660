"""The frozen foundation models of the training-free methods (PerSAM, Matcher, GF-SAM): SAM from
Meta's `segment-anything` package and DINOv2 from `timm`, built here and loaded from the official
weight files in $FSBENCH_WEIGHTS (nothing is downloaded).

Why these packages: `segment-anything` is Meta's own SAM code (the official methods vendor a copy
of it, identical in every module they call); timm's VisionTransformer holds DINOv2's ViT/14 under
the official parameter names (LayerScale `ls1.gamma`, pre-norm blocks), so the official
`dinov2_vit*14_pretrain.pth` loads as it is, and timm is kept, versioned and on PyPI, where the
official DINOv2 code is not a package. Sizes: the official ones, plus `tiny` (a ViT with the same
code paths, for CPU tests with random weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.resize import IMAGENET_MEAN, IMAGENET_STD
from fsbench.methods.weights import imagenet_weights_path, read_state_dict

# What each model was pretrained on beyond ImageNet (a method's `pretraining` joins them).
SAM_DATA, DINOV2_DATA = "SA-1B", "LVD-142M"

# name → (embed dim, depth, heads, global attention blocks), segment_anything/build_sam.py
SAM_SIZES = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "tiny": (64, 2, 2, (1,)),
}
SAM_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
# name → (embed dim, depth, heads), dinov2/hub/backbones.py
DINOV2_SIZES = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "tiny": (48, 2, 2),
}
DINOV2_FILES = {
    "vit_small": "dinov2_vits14_pretrain.pth",
    "vit_base": "dinov2_vitb14_pretrain.pth",
    "vit_large": "dinov2_vitl14_pretrain.pth",
}
DINOV2_SIZE = 518  # the image side the DINOv2 methods feed it (37 × 37 patches of 14)


def _weights_file(weights, default: str | None, what: str):
    """None for random weights; else the file: a path, or the official name in $FSBENCH_WEIGHTS."""
    if weights == "random":
        return None
    if weights in (None, "official"):
        if default is None:
            raise FsbenchError(f"{what} has no official weight file; use weights: random")
        return imagenet_weights_path(default)
    return weights


def _sam(dim: int, depth: int, heads: int, global_blocks, image_size: int):
    """segment_anything's `_build_sam` with the image side as a parameter (1024: the same
    modules; a smaller side only for the test variants' random-weight models)."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    embedding = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(global_blocks),
            window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(embedding, embedding),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip


def build_sam(size: str = "vit_h", weights=None, image_size: int = 1024):
    """SAM (segment_anything `Sam`) of `size`, its official weights unless `weights: random`; a
    file of another size is one line naming it and the size it holds."""
    if size not in SAM_SIZES:
        raise FsbenchError(f"SAM size {size!r}: choose one of {', '.join(SAM_SIZES)}")
    if image_size % 16 or image_size < 64:
        raise FsbenchError(f"SAM image side {image_size}: a multiple of 16, at least 64 (1024)")
    dim, depth, heads, global_blocks = SAM_SIZES[size]
    path = _weights_file(weights, SAM_FILES.get(size), f"SAM {size}")
    state = None
    if path is not None:  # read and checked before the (large) model is built
        fix = f"put the official {SAM_FILES.get(size, 'SAM')} in $FSBENCH_WEIGHTS or give its path"
        state = read_state_dict(path, "SAM checkpoint", fix)
        held = state.get("image_encoder.patch_embed.proj.weight")
        blocks = _blocks(state, "image_encoder.")
        if held is None or held.shape[0] != dim or blocks != depth:
            found = next(
                (f"SAM {n}" for n, (d, b, _, _) in SAM_SIZES.items()
                 if held is not None and (d, b) == (held.shape[0], blocks)),
                "not a SAM",
            )  # fmt: skip
            raise FsbenchError(
                f"{path}: {found} checkpoint, the method asks for SAM {size}; give "
                f"{SAM_FILES.get(size, 'its file')} or set the method's sam: to the file's size"
            )
    sam = _sam(dim, depth, heads, global_blocks, image_size)
    if state is not None:
        _load(sam, state, path, "SAM")
    return sam.eval().requires_grad_(False)


def _blocks(state: dict, prefix: str) -> int:
    ids = {k[len(prefix) :].split(".")[1] for k in state if k.startswith(prefix + "blocks.")}
    return len(ids)


def _load(module: nn.Module, state: dict, path, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = ", ".join((missing + unexpected)[:4])
        raise FsbenchError(f"{path}: not an official {what} state dict (missing or unexpected: "
                           f"{names}); give the official file")  # fmt: skip


class Dinov2(nn.Module):
    """DINOv2 ViT/14 at 518 px (timm's VisionTransformer, the official parameter names)."""

    def __init__(self, size: str = "vit_large", weights=None):
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        if size not in DINOV2_SIZES:
            raise FsbenchError(f"DINOv2 size {size!r}: choose one of {', '.join(DINOV2_SIZES)}")
        dim, depth, heads = DINOV2_SIZES[size]
        self.patch_size = 14
        self.vit = VisionTransformer(
            img_size=DINOV2_SIZE, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, num_classes=0,
        )  # fmt: skip
        path = _weights_file(weights, DINOV2_FILES.get(size), f"DINOv2 {size}")
        if path is not None:
            fix = (f"put the official {DINOV2_FILES.get(size, 'DINOv2')} in $FSBENCH_WEIGHTS or "
                   "give its path")  # fmt: skip
            self.load_official(read_state_dict(path, "DINOv2 checkpoint", fix), path, size)
        self.eval().requires_grad_(False)

    def load_official(self, state: dict, path="DINOv2 state dict", size: str = "") -> None:
        """The official state dict (its `teacher` part if any, `module.`/`backbone.` stripped,
        the unused mask token dropped), as dinov2's load_pretrained_weights reads it."""
        state = state.get("teacher", state)
        state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in state.items()}
        state.pop("mask_token", None)
        held = state.get("pos_embed")
        if held is not None and held.shape[-1] != self.vit.embed_dim:
            found = next((n for n, (d, _, _) in DINOV2_SIZES.items() if d == held.shape[-1]), "?")
            raise FsbenchError(f"{path}: a DINOv2 {found} checkpoint, the method asks for "
                               f"{size or self.vit.embed_dim}; set dinov2: {found}")  # fmt: skip
        _load(self.vit, state, path, "DINOv2")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens before the last norm (`x_prenorm[:, 1:]`): [B, h·w, C], at any side
        that is a multiple of 14 (the position embedding interpolated as DINOv2's own)."""
        vit = self.vit
        vit.patch_embed.strict_img_size = False
        x = vit.patch_embed(images)
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._position(x, images.shape[-2], images.shape[-1])
        return vit.blocks(vit.norm_pre(x))[:, 1:]

    def _position(self, x, w: int, h: int) -> torch.Tensor:
        """DinoVisionTransformer.interpolate_pos_encoding: the 37 × 37 grid as it is at 518 px,
        else bicubic by (side/14 + 0.1) / 37 (its offset against float error)."""
        pos_embed = self.vit.pos_embed
        n = pos_embed.shape[1] - 1
        if x.shape[1] - 1 == n and w == h:
            return pos_embed
        pos_embed = pos_embed.float()
        dim, side = x.shape[-1], int(math.sqrt(n))
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        grid = F.interpolate(
            pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic",
        )  # fmt: skip
        grid = grid.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos_embed[:, 0].unsqueeze(0), grid), dim=1).to(x.dtype)


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """The ToTensor image (uint8 / 255) behind the engine's ImageNet-normalised input, exact:
    the pixels are rounded back to the integers they were."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = torch.round((images * std + mean) * 255).clamp_(0, 255)
    return pixels.to(torch.uint8).float().div(255)


def dinov2_input(image01: torch.Tensor) -> torch.Tensor:
    """The official methods' DINOv2 transform of a ToTensor image: Resize(518) (bilinear,
    antialiased, torchvision on tensors) then ImageNet normalisation."""
    from torchvision.transforms import functional as TF

    resized = TF.resize(image01, DINOV2_SIZE, interpolation=TF.InterpolationMode.BILINEAR)
    return TF.normalize(resized, IMAGENET_MEAN, IMAGENET_STD)


def normalise_imagenet(image01: torch.Tensor) -> torch.Tensor:
    """DINOv2's `make_normalize_transform` on a ToTensor image (Matcher: no resize)."""
    from torchvision.transforms import functional as TF

    return TF.normalize(image01, IMAGENET_MEAN, IMAGENET_STD)


def sam_embedding(sam, image01: torch.Tensor) -> torch.Tensor:
    """SamPredictor.set_image of `img.mul(255).byte()` (the official methods' numpy image):
    ResizeLongestSide to SAM's side, normalise, pad, image encoder → [B, 256, 64, 64]."""
    from segment_anything.utils.transforms import ResizeLongestSide

    side = sam.image_encoder.img_size
    pixels = image01.mul(255).byte()
    if max(pixels.shape[-2:]) != side:
        transform = ResizeLongestSide(side)
        resized = [transform.apply_image(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        pixels = torch.stack([torch.as_tensor(r).permute(2, 0, 1) for r in resized])
        pixels = pixels.to(image01.device)
    return sam.image_encoder(sam.preprocess(pixels.float()))


def first_claim_labels(masks: torch.Tensor) -> torch.Tensor:
    """Episode labels from N one-way masks [N, H, W] of a method that is 1-way in its paper: a
    pixel several classes claim goes to the first of them."""
    labels = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    for way in range(masks.shape[0] - 1, -1, -1):
        labels[masks[way] > 0] = way + 1
    return labels


def count_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def grid_side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise FsbenchError(f"{tokens} patch tokens do not form a square grid")
    return side


def resize_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    """[n, H, W] → [n, side, side], bilinear with aligned corners (the methods' prior masks)."""
    return F.interpolate(mask[:, None].float(), (side, side), mode="bilinear",
                         align_corners=True)[:, 0]  # fmt: skip
