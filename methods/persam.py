"""PerSAM and PerSAM-F (Zhang et al., "Personalize Segment Anything Model with One Shot", ICLR
2024; ZrrSkywalker/Personalize-SAM persam.py, persam_f.py), training-free on SAM ViT-H.

PerSAM: the support's SAM features under its mask (the mask as an image through SAM's
normalisation, bilinear to the 64 × 64 grid, > 0) give a target embedding; its cosine similarity
with the query's features (upsampled as SAM's masks are) gives a positive point (the maximum) and
a negative one (the minimum); SAM decodes them with target-guided attention and target-semantic
prompting (methods/sam_prompting.py), then refines twice (its mask as input, then its box too).

PerSAM-F: the target embedding is the mean and maximum of the support's features averaged; two
weights mixing SAM's three multimask logits are fitted on the support itself (1000 AdamW steps,
lr 1e-3, eps 1e-4, cosine schedule; dice + sigmoid focal loss against the support mask; SAM's
logits do not change during the fit, so they are computed once), then the query's mixed mask
starts the two refinements.

On fsbench's `support_states` path: each distinct image's SAM embedding is encoded once; a
support's state is its masked features' sum and count and, for PerSAM-F, its target feature and
fitted weights. Several shots (the papers are 1-shot): the target is the mean over every shot's
masked features (PerSAM) or the shots' targets and weights averaged (PerSAM-F). Where the
official code raises (an empty mask in a refinement, an empty support mask), fsbench keeps the
last mask (the refinement is skipped) and predicts background.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsbench.methods.base import FewShotMethod
from fsbench.methods.foundation import (
    SAM_DATA,
    build_sam,
    first_claim_labels,
    sam_embedding,
    unnormalise,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.sam_prompting import predict

SAM_PIXEL_MEAN_R, SAM_PIXEL_STD_R = 123.675, 58.395  # the mask's first channel through preprocess


def point_selection(sim: torch.Tensor, negative: bool = True):
    """persam.py's point_selection (top-1, and the bottom-1 as a negative): (x, y) points."""
    w = sim.shape[1]
    points, labels = [], []
    for largest, label in ((True, 1), (False, 0))[: 2 if negative else 1]:
        index = sim.flatten(0).topk(1, largest=largest)[1]
        row = index // w
        points.append(torch.stack([index - row * w, row], 1).cpu().numpy())
        labels.append(np.array([label]))
    return np.concatenate(points), np.concatenate(labels)


def box_of(mask) -> np.ndarray | None:
    y, x = np.nonzero(np.asarray(mask.cpu()))
    if len(x) == 0:
        return None
    return np.array([x.min(), y.min(), x.max(), y.max()])[None, :]


def dice_loss(inputs, targets):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2):
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum()


class PerSAM(FewShotMethod):
    trainable = False
    cacheable_encoder = True
    support_states = True
    output_kind = "labels"
    pretraining = (SAM_DATA,)
    version = "1"
    cost = "SAM ViT-H (1024 px) once per distinct image; 3 SAM decodes per episode"
    fine_tuned = False

    def __init__(self, sam="vit_h", sam_weights=None, sam_image_size=1024, steps=1000, lr=1e-3):
        super().__init__()
        self.sam = build_sam(sam, sam_weights, sam_image_size)
        self.steps, self.lr = steps, lr
        self.trace: list | None = None

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.sam.parameters()) + (2 if self.fine_tuned else 0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return sam_embedding(self.sam, unnormalise(images))

    def _grid_mask(self, fg: torch.Tensor) -> torch.Tensor:
        """persam.py's reference mask on the feature grid: the 0/255 mask image resized as SAM
        resizes images, normalised as its pixels (first channel), padded, bilinear, > 0."""
        from segment_anything.utils.transforms import ResizeLongestSide

        side = self.sam.image_encoder.img_size
        image = (fg.cpu().numpy() * 255).astype(np.uint8)
        if max(image.shape) != side:
            rgb = np.repeat(image[..., None], 3, axis=2)
            image = ResizeLongestSide(side).apply_image(rgb)[..., 0]
        x = (torch.as_tensor(image, device=fg.device) - SAM_PIXEL_MEAN_R) / SAM_PIXEL_STD_R
        x = F.pad(x, (0, side - x.shape[1], 0, side - x.shape[0]))
        grid = self.sam.image_encoder.img_size // 16
        return F.interpolate(x[None, None], size=(grid, grid), mode="bilinear")[0, 0] > 0

    def support_state(self, support_features, support_fg, support_bg) -> torch.Tensor:
        states = []
        for embedding, fg in zip(support_features, support_fg):
            feats = embedding.permute(1, 2, 0)[self._grid_mask(fg)]  # [n, 256]
            count = feats.new_tensor([feats.shape[0]])
            state = [feats.sum(0), count]
            if self.fine_tuned:
                state += self._fit(embedding[None], fg, feats)
            states.append(torch.cat(state))
        return torch.stack(states)

    def _similarity(self, target, embedding, size):
        """Cosine similarity of the target with each feature, upsampled as SAM's masks: [S, S]."""
        c, h, w = embedding.shape[1:]
        feats = embedding[0] / embedding[0].norm(dim=0, keepdim=True)
        sim = (target @ feats.reshape(c, h * w)).reshape(1, 1, h, w)
        sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
        side = self.sam.image_encoder.img_size
        from segment_anything.utils.transforms import ResizeLongestSide

        input_size = ResizeLongestSide.get_preprocess_shape(size[0], size[1], side)
        return self.sam.postprocess_masks(sim, input_size, size).squeeze()

    def predict_states(self, query_features, support_states, out_size) -> torch.Tensor:
        size = tuple(out_size)
        rows = []
        for q in range(query_features.shape[0]):
            episodes = []
            for states in support_states[q]:  # [N, K, D]
                masks = [self.one_way(query_features[q : q + 1], way, size) for way in states]
                episodes.append(first_claim_labels(torch.stack(masks)))
            rows.append(torch.stack(episodes))
        return torch.stack(rows).long()

    def one_way(self, embedding, states, size) -> torch.Tensor:
        counts = states[:, 256]
        if counts.sum() == 0:
            return torch.zeros(size, device=embedding.device)
        target = (states[:, :256].sum(0) / counts.sum())[None]  # [1, 256]
        trace = {} if self.trace is not None else None
        mask = self.segment(embedding, target, size, trace)
        if trace is not None:
            self.trace.append(trace)
        return mask

    def segment(self, embedding, target_embedding, size, trace) -> torch.Tensor:
        """persam.py's test loop body for one query."""
        target = target_embedding / target_embedding.norm(dim=-1, keepdim=True)
        sim = self._similarity(target, embedding, size)
        points, labels = point_selection(sim)
        sim = (sim - sim.mean()) / torch.std(sim)
        grid = self.sam.image_encoder.img_size // 16
        sim = F.interpolate(sim[None, None], size=(grid, grid), mode="bilinear")
        attn_sim = sim.sigmoid_().unsqueeze(0).flatten(3)
        _, _, logits, _ = predict(
            self.sam, embedding, size, points, labels, multimask=False, attn_sim=attn_sim,
            target=target_embedding[None],
        )  # fmt: skip
        masks, scores, logits, _ = predict(
            self.sam, embedding, size, points, labels, mask_input=logits[0:1], multimask=True
        )
        if trace is not None:
            trace.update(points=points, first_logits=logits)
        return self.refine(embedding, size, points, labels, masks, scores, logits)

    def refine(self, embedding, size, points, labels, masks, scores, logits) -> torch.Tensor:
        """The last cascaded refinement: the best mask's box and logits as prompts."""
        best = int(torch.argmax(scores))
        box = box_of(masks[best])
        if box is None:
            return masks[best].float()
        masks, scores, _, _ = predict(
            self.sam, embedding, size, points, labels, box=box, mask_input=logits[best : best + 1]
        )
        return masks[int(torch.argmax(scores))].float()


class PerSAMF(PerSAM):
    fine_tuned = True
    cost = (
        "SAM ViT-H (1024 px) once per distinct image; 1000 AdamW steps on 2 weights per support; "
        "3 SAM decodes per episode"
    )

    def _fit(self, embedding, fg, feats) -> list[torch.Tensor]:
        """persam_f.py's training on the support: its target feature and the two weights."""
        size = tuple(fg.shape)
        if feats.shape[0] == 0:
            return [feats.new_zeros(256), feats.new_tensor([1 / 3, 1 / 3])]
        target = (feats.max(0)[0] / 2 + feats.mean(0) / 2)[None]
        target = target / target.norm(dim=-1, keepdim=True)
        sim = self._similarity(target, embedding, size)
        points, labels = point_selection(sim, negative=False)
        with torch.no_grad():
            _, _, _, high = predict(self.sam, embedding, size, points, labels, multimask=True)
        high = high.flatten(1)
        gt = fg.float().flatten()[None]
        weights = torch.nn.Parameter(torch.ones(2, 1, device=fg.device) / 3)
        optimizer = torch.optim.AdamW([weights], lr=self.lr, eps=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        with torch.enable_grad():
            for _ in range(self.steps):
                mixed = torch.cat((1 - weights.sum(0)[None], weights), dim=0)
                logits = (high * mixed).sum(0)[None]
                loss = dice_loss(logits, gt) + focal_loss(logits, gt)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        return [target[0], weights.detach()[:, 0]]

    def one_way(self, embedding, states, size) -> torch.Tensor:
        if states[:, 256].sum() == 0:
            return torch.zeros(size, device=embedding.device)
        target = states[:, 257:513].mean(0)[None]
        weights = states[:, 513:515].mean(0)
        mixed = torch.cat((1 - weights.sum()[None], weights))
        sim = self._similarity(target, embedding, size)
        points, labels = point_selection(sim, negative=False)
        masks, scores, low, high = predict(self.sam, embedding, size, points, labels)
        mask = (high * mixed[:, None, None]).sum(0) > 0
        logit = (low * mixed[:, None, None]).sum(0)
        if self.trace is not None:
            self.trace.append({"points": points, "weights": mixed, "mask": mask})
        box = box_of(mask)
        if box is None:
            return mask.float()
        masks, scores, logits, _ = predict(
            self.sam, embedding, size, points, labels, box=box, mask_input=logit[None]
        )
        return self.refine(embedding, size, points, labels, masks, scores, logits)


@METHODS.register(display="PerSAM")
def persam(sam="vit_h", sam_weights=None, sam_image_size=1024) -> PerSAM:
    """PerSAM: SAM prompted by the support's target embedding; training-free."""
    return PerSAM(sam, sam_weights, sam_image_size)


@METHODS.register(display="PerSAM-F")
def persam_f(sam="vit_h", sam_weights=None, sam_image_size=1024, steps=1000, lr=1e-3) -> PerSAMF:
    """PerSAM-F: PerSAM with two mask-scale weights fitted on each support (1000 steps)."""
    return PerSAMF(sam, sam_weights, sam_image_size, steps, lr)
