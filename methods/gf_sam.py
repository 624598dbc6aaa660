"""GF-SAM (Zhang et al., "Bridge the Points: Graph-based Few-shot Segment Anything Semantically",
NeurIPS 2024; ANDYZAQ/GF-SAM matcher/GFSAM.py), training-free: DINOv2 ViT-L/14 patch features
match the query to the supports; the best-matching patches prompt SAM ViT-H one point each; the
masks are clustered as a graph of points (a point links to the points its mask covers), each
cluster grown from its most positive masks, points kept by self-consistency, their masks merged.

On fsbench's `support_states` path: each distinct image's DINOv2 tokens (pre-norm, each channel
L2-normalised over the tokens as GF-SAM does) and SAM embedding are encoded once; a support's
state is its tokens and its mask (and the complement) resized to the 37 × 37 token grid; the
query's SAM embedding is prompted per episode. Output: labels at the input (1024 px, SAM's side,
where GF-SAM scores). Checked against the official code with random weights
(tests/test_parity_foundation.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csgraph

from fsbench.methods.base import FewShotMethod
from fsbench.methods.foundation import (
    DINOV2_DATA,
    SAM_DATA,
    Dinov2,
    build_sam,
    count_parameters,
    dinov2_input,
    resize_mask,
    sam_embedding,
    unnormalise,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.sam_prompting import prompted_logits

EPS = 1e-7
MAX_POINTS = 128  # find_points: "set maximum to 128 for efficiency"
PROMPT_BATCH = 64  # generate_sam_masks: batch_iterator(64, …)


def prior(query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor):
    """GF-SAM's generate_prior: query tokens [1, N, C], support tokens [K, N, C], masks [K, s, s]
    on the token grid → (max-similarity map, mean-similarity map), each [1, s, s], shot-averaged."""
    side = masks.shape[-1]
    tokens = side * side
    q = query.permute(0, 2, 1)
    q_norm = torch.norm(q, 2, 1, True)
    maxima, means = [], []
    for shot in range(supports.shape[0]):
        s = supports[shot : shot + 1]
        s_norm = torch.norm(s, 2, 2, True)
        similarity = torch.bmm(s, q) / (torch.bmm(s_norm, q_norm) + EPS)  # [1, Ns, Nq]
        mask = F.interpolate(masks[shot][None, None], size=(side, side), mode="bilinear",
                             align_corners=True).flatten(2).transpose(-1, -2)  # fmt: skip
        similarity = similarity * mask
        means.append(similarity.mean(1).view(1, 1, side, side) / (mask.sum() / tokens + EPS))
        maxima.append(similarity.max(1)[0].view(1, 1, side, side))
    return torch.cat(maxima, 1).mean(1), torch.cat(means, 1).mean(1)


class GFSAM(FewShotMethod):
    trainable = False
    cacheable_encoder = True
    support_states = True
    feature_layout = "maps"
    output_kind = "labels"
    pretraining = (SAM_DATA, DINOV2_DATA)
    version = "1"
    cost = (
        "SAM ViT-H (1024 px) and DINOv2 ViT-L/14 (518 px) once per distinct image; up to 128 "
        "one-point SAM decodes per episode"
    )

    def __init__(self, sam="vit_h", dinov2="vit_large", sam_weights=None, dinov2_weights=None,
                 max_points=MAX_POINTS, sam_image_size=1024):  # fmt: skip
        super().__init__()
        self.sam = build_sam(sam, sam_weights, sam_image_size)
        self.max_points = max_points
        self.dinov2 = Dinov2(dinov2, dinov2_weights)
        self.side = 518 // 14
        self.trace: list | None = None  # set to [] to keep each episode's maps (parity tests)

    def parameter_count(self) -> int:
        return count_parameters(self.sam, self.dinov2)

    # -- encodings -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor):
        image01 = unnormalise(images)
        tokens = F.normalize(self.dinov2(dinov2_input(image01)), dim=1, p=2)  # over the tokens
        grid = tokens.permute(0, 2, 1).unflatten(2, (self.side, self.side))
        return grid, sam_embedding(self.sam, image01)

    def support_state(self, support_features, support_fg, support_bg) -> torch.Tensor:
        tokens = support_features[0].flatten(1)
        fg = support_fg.float()
        box = torch.zeros_like(fg)
        h, w = fg.shape[-2:]
        box[:, h // 2 - 7 : h // 2 + 7, w // 2 - 7 : w // 2 + 7] = 1
        masks = [resize_mask(m, self.side).flatten(1) for m in (fg, 1 - fg, box, 1 - box)]
        empty = (fg.flatten(1).sum(1, keepdim=True) == 0).float()
        return torch.cat([tokens, *masks, empty], 1)

    def predict_states(self, query_features, support_states, out_size) -> torch.Tensor:
        grids, embeddings = query_features
        rows = []
        for q in range(grids.shape[0]):
            query = grids[q].flatten(1).T[None]  # [1, N, C]
            episodes = []
            for states in support_states[q]:  # [N, K, D]
                masks, means = [], []
                for way in states:  # GF-SAM is 1-way: each class alone, overlaps decided below
                    mask, mean = self.one_way(query, way, embeddings[q : q + 1], tuple(out_size))
                    masks.append(mask)
                    means.append(mean)
                episodes.append(self.combine(torch.stack(masks), torch.cat(means), out_size))
            rows.append(torch.stack(episodes))
        return torch.stack(rows).long()

    def one_way(self, query, states, embedding, size):
        """One class's mask and mean-similarity map from its K support states."""
        tokens = self.side * self.side
        masks = states[:, -4 * tokens - 1 : -1].unflatten(1, (4, self.side, self.side))
        if bool((states[:, -1] == 1).all()):  # every support empty: GF-SAM's central box
            pos, neg = masks[:, 2], masks[:, 3]
        else:
            pos, neg = masks[:, 0], masks[:, 1]
        supports = states[:, : -4 * tokens - 1].unflatten(1, (-1, tokens)).transpose(1, 2)
        return self.segment(query, supports, pos, neg, embedding, size)

    @staticmethod
    def combine(masks, means, size) -> torch.Tensor:
        """Episode labels from N one-way masks: a pixel several classes claim goes to the class
        whose mean-similarity map (bilinear to the input) is highest there (N = 1: the mask)."""
        if masks.shape[0] == 1:
            return masks[0]
        scores = F.interpolate(means[:, None], size=tuple(size), mode="bilinear",
                               align_corners=False)[:, 0]  # fmt: skip
        scores = torch.where(masks > 0, scores, torch.full_like(scores, -torch.inf))
        return torch.where((masks > 0).any(0), scores.argmax(0) + 1, 0).float()

    # -- GF-SAM's predict() ----------------------------------------------------------------------
    def segment(self, query, supports, pos, neg, embedding, size) -> torch.Tensor:
        """One episode (1-way): the query's mask (0/1) at `size`, the input's side (SAM's
        predictor resizes the image to its own side and its masks back), and the mean map."""
        if self.trace is not None:
            self.trace.append({})
        neg_sim, neg_mean = prior(query, supports, neg)
        sim, mean = prior(query, supports, pos)
        half = (mean.max() + mean.min()) / 2
        cross = mean * sim
        cross = (cross - cross.min()) / (cross.max() - cross.min() + 1e-6)
        neg_std = (neg_mean - neg_mean.min()) / (neg_mean.max() - neg_mean.min() + 1e-6)
        filtered = cross * ~(neg_std > cross)
        points, hot, coord_f = self.find_points(filtered)
        masks = self.sam_masks(embedding, points, size)
        if self.trace is not None:
            self.trace[-1].update(sim=sim, mean=mean, neg_mean=neg_mean, filtered=filtered,
                              points=points, masks=masks)  # fmt: skip
        if masks is None:
            return torch.zeros(size, device=query.device), mean
        n_weak, weak = self.cluster(masks, coord_f, hot)
        fgbg, scores = self.classify(masks, weak, n_weak, mean * mean, neg_mean * half)
        selected = self.consistency(query, masks, weak, n_weak, fgbg, coord_f)
        return self.merge(masks, selected, scores, size)[0], mean

    def find_points(self, sim_map):
        total = sim_map.sum()
        topk = min(int(total), self.max_points)
        if topk == 0 and total > 0:
            topk = 1
        flat = sim_map.flatten(0)
        hot = torch.zeros_like(flat)
        hot[flat.topk(topk)[1]] = 1
        hot = hot.view(1, *sim_map.shape[1:]).squeeze(0).cpu().numpy()
        coord_f = np.argwhere(hot.T > 0)  # (x, y), by x then y
        scale = self.sam.image_encoder.img_size / sim_map.shape[-1]  # ResizeLongestSide coords
        points = coord_f.astype(float) * scale
        return points, hot, coord_f

    def sam_masks(self, embedding, points, size):
        """SAM on each point alone (single-mask output), thresholded at 0: [M, 1, *size]."""
        if len(points) == 0:
            return None
        out = []
        for start in range(0, len(points), PROMPT_BATCH):
            coords = torch.as_tensor(points[start : start + PROMPT_BATCH], device=embedding.device,
                                     dtype=torch.int)[:, None, :]  # fmt: skip
            labels = torch.ones(coords.shape[:2], device=embedding.device, dtype=torch.int)
            high, _, low_res = prompted_logits(self.sam, embedding, size, coords, labels, False)
            if self.trace is not None:
                self.trace[-1].setdefault("low_res", []).append(low_res)
            out.append(high > self.sam.mask_threshold)
        return torch.cat(out)

    def cluster(self, masks, coord_f, hot):
        """mask_cluster: weakly connected components of the point graph."""
        hot = torch.as_tensor(hot > 0, device=masks.device, dtype=torch.float)
        small = F.interpolate(masks.float(), hot.shape[-2:], mode="nearest").squeeze(1)
        adjacent = (small * hot[None]).flatten(1)
        index = torch.as_tensor(coord_f[:, 1] * hot.shape[-1] + coord_f[:, 0], device=masks.device)
        graph = adjacent[:, index].cpu().numpy()
        n, labels = csgraph.connected_components(graph, directed=True, connection="weak",
                                                 return_labels=True)  # fmt: skip
        return n, torch.as_tensor(labels, device=masks.device, dtype=torch.long)

    def classify(self, masks, labels, n, mean_map, neg_map):
        """cluster_classification: grow each cluster from its most positive masks."""
        side = self.side
        fgbg = torch.zeros_like(labels)
        scores = torch.zeros_like(labels, dtype=torch.float)
        positive = (mean_map > neg_map).float()
        for component in range(n):
            members = torch.where(labels == component)[0]
            small = F.interpolate(masks[members].float(), (side, side), mode="bilinear",
                                  align_corners=False)  # fmt: skip
            ranking = (small * (mean_map - neg_map)[None]).sum(dim=(-1, -2, -3))
            ranking = ranking / (small.sum(dim=(-1, -2, -3)) + 1e-6)
            inner = torch.zeros_like(small[0])
            # (the official scores the cluster's union first; the loop below, never empty,
            # always overwrites those scores, so they are not computed)
            for idx in ranking.argsort(descending=True):
                current = small[idx] * (1 - inner)
                pos_score = (positive * current).sum()
                neg_score = ((1 - positive) * current).sum()
                if pos_score > neg_score:
                    inner += current
                    fgbg[members[idx]] = 1
            scores[members] = pos_score - neg_score
        return fgbg, scores

    def consistency(self, query, masks, labels, n, fgbg, coord_f):
        """point_consistency_dis: 1 = kept, 2 = waiting (a fallback), 0 = dropped."""
        side = self.side
        coord = torch.as_tensor(coord_f, device=masks.device, dtype=torch.long)
        similarities = []
        for component in range(n):
            members = torch.where(labels == component)[0]
            union = (masks[members].sum(dim=0) > 0).float()
            union = F.interpolate(union[None], (side, side), mode="bilinear", align_corners=False)[
                0
            ]
            similarities.append(prior(query, query, union)[1])
        similarities = torch.cat(similarities, dim=0)[:, coord[:, 1], coord[:, 0]]  # [n, M]
        distance = torch.cdist(coord.float(), coord.float())
        nearest = torch.zeros_like(similarities)
        for idx in range(coord.shape[0]):
            for component in range(n):
                members = torch.where(labels == component)[0]
                nearest[component, idx] = distance[idx, members].min()
        nearest[nearest == 0] = 1
        best = (similarities / nearest).max(dim=0)[1]
        selection = torch.where(best == labels, 1, 0)
        for component in range(n):
            members = torch.where(labels == component)[0]
            kept = selection[members].sum()
            if kept < len(members) - kept:
                selection[members] = 0
        positive = (selection * fgbg) > 0
        waiting = ((selection + fgbg) > 0).long() * 2
        waiting[positive] = 1
        return waiting

    def merge(self, masks, selected, scores, size):
        """triplet_selection_b: the union of kept masks, else the best-scored waiting one."""
        merged = torch.zeros((1, *size), device=masks.device)
        for idx, label in enumerate(selected):
            if label == 1:
                merged += masks[idx]
        merged = (merged > 0).float()
        if merged.sum() == 0:
            scores = scores.clone()
            scores[selected != 2] = 0
            merged += masks[scores.max(dim=0)[1]]
        return merged


@METHODS.register("gf_sam", display="GF-SAM")
def gf_sam(sam="vit_h", dinov2="vit_large", sam_weights=None, dinov2_weights=None,
           max_points=MAX_POINTS, sam_image_size=1024) -> GFSAM:  # fmt: skip
    """GF-SAM: DINOv2 point prompts to SAM, clustered as a graph; training-free (its input:
    1024 px, an entry's `input_size`)."""
    return GFSAM(sam, dinov2, sam_weights, dinov2_weights, max_points, sam_image_size)
