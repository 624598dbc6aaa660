"""Matcher (Liu et al., "Matcher: Segment Anything with One Shot Using All-Purpose Feature
Matching", ICLR 2024; aim-uofa/Matcher matcher/Matcher.py), training-free: DINOv2 patch features
of the query and the supports matched both ways by the Hungarian algorithm; the matched query
patches prompt SAM (its automatic mask generator over a dense grid, plus robustly sampled subsets
of 1–6 matched points); each mask is scored by the earth mover's distance between the support's
and the mask's features, purity and coverage; masks are filtered and the best merged.

The defaults are its scripts/coco.sh and lvis.sh (FSS-1000's settings: matcher_fss kwargs).
The prompt sampler draws with Python's `random` (`random.sample`), seeded once per run
(`random.seed(0)` at main_oss.py's import) and consumed episode after episode, a number of draws
that depends on each episode's matches: Matcher runs on the `episode` path, episodes in the
manifest's order, its generator reset at each manifest's start (`begin_episodes`), so a run
draws what the official run draws. Checked against the official code with random weights
(tests/test_parity_foundation.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from fsbench.methods.base import FewShotMethod
from fsbench.methods.foundation import (
    DINOV2_DATA,
    SAM_DATA,
    Dinov2,
    build_sam,
    count_parameters,
    first_claim_labels,
    normalise_imagenet,
    sam_embedding,
    unnormalise,
)
from fsbench.methods.registry import METHODS
from fsbench.methods.sam_prompting import prompted_logits


class Matcher(FewShotMethod):
    trainable = False
    output_kind = "labels"
    pretraining = (SAM_DATA, DINOV2_DATA)
    version = "1"
    cost = (
        "SAM ViT-H (1024 px) and DINOv2 ViT-L/14 per episode (its sampler's order: no cache); "
        "4096 dense + up to 384 sampled SAM decodes and one EMD per mask"
    )

    def __init__(self, sam="vit_h", dinov2="vit_large", sam_weights=None, dinov2_weights=None,
                 sam_image_size=1024, points_per_side=64, points_per_batch=64,
                 pred_iou_thresh=0.88, stability_score_thresh=0.95, sel_stability_score_thresh=0.90,
                 iou_filter=0.85, box_nms_thresh=0.65, output_layer=3, dense_multimask_output=0,
                 use_dense_mask=1, multimask_output=1, sample_range=(1, 6),
                 max_sample_iterations=64, alpha=1.0, beta=0.0, exp=0.0, emd_filter=0.0,
                 purity_filter=0.02, coverage_filter=0.0, use_score_filter=True,
                 deep_score_norm_filter=0.1, deep_score_filter=0.33, topk_scores_threshold=0.0,
                 num_merging_mask=9, seed=0):  # fmt: skip
        super().__init__()
        self.sam = build_sam(sam, sam_weights, sam_image_size)
        self.dinov2 = Dinov2(dinov2, dinov2_weights)
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_thresh, self.stability_score_thresh = pred_iou_thresh, stability_score_thresh
        self.sel_stability_score_thresh, self.iou_filter = sel_stability_score_thresh, iou_filter
        self.box_nms_thresh = box_nms_thresh
        self.output_layer, self.dense_output_layer = output_layer, dense_multimask_output
        self.dense, self.dense_multimask = bool(use_dense_mask), dense_multimask_output > 0
        self.sel_multimask = multimask_output > 0
        self.sample_range, self.max_iterations = tuple(sample_range), max_sample_iterations
        self.alpha, self.beta, self.exp = alpha, beta, exp
        self.filters = {"coverage": coverage_filter, "emd": emd_filter, "purity": purity_filter}
        self.use_score_filter = use_score_filter
        self.deep_score, self.deep_score_norm = deep_score_filter, deep_score_norm_filter
        self.topk_scores_threshold, self.num_merging_mask = topk_scores_threshold, num_merging_mask
        self.seed = seed
        self.random = random.Random(seed)
        self.trace: list | None = None

    @classmethod
    def input_size_problem(cls, size: int) -> str | None:
        if size % 14:
            near = 14 * round(size / 14)
            return f"Matcher feeds its input to DINOv2 ViT/14 unresized: a multiple of 14 ({near})"
        return None

    def begin_episodes(self) -> None:
        """A manifest's episodes start: the sampler's generator as main_oss.py seeds it."""
        self.random = random.Random(self.seed)

    def parameter_count(self) -> int:
        return count_parameters(self.sam, self.dinov2)

    # -- one episode -----------------------------------------------------------------------------
    def forward(self, episode) -> torch.Tensor:
        rows = []
        for q in range(episode.query_images.shape[0]):
            masks = {}
            for way in range(episode.way - 1, -1, -1):  # the sampler's draws: last way first
                masks[way] = self.segment(episode.support_images[way], episode.support_fg[way],
                                          episode.query_images[q : q + 1])  # fmt: skip
            rows.append(first_claim_labels(torch.stack([masks[w] for w in range(episode.way)])))
        return torch.stack(rows)

    def segment(self, support_images, support_fg, query_image) -> torch.Tensor:
        """set_reference, set_target, predict: the query's mask [S, S] (0/1)."""
        patch = self.dinov2.patch_size
        masks = support_fg[:, None].float().clone()
        if masks.sum() == 0:  # reference_masks_verification: a central box
            sh, sw = masks.shape[-2:]
            masks[..., sh // 2 - 7 : sh // 2 + 7, sw // 2 - 7 : sw // 2 + 7] = 1
        pool = (F.avg_pool2d(masks, (patch, patch)) > self.sam.mask_threshold).float().reshape(-1)
        feat_size = support_fg.shape[-1] // patch
        query01 = unnormalise(query_image)
        ref = self._features(unnormalise(support_images))
        tar = self._features(query01)
        points, cost = self._match(ref, tar, pool, feat_size, support_fg.shape[-2:])
        embedding = sam_embedding(self.sam, query01)
        size = tuple(query_image.shape[-2:])
        masks = self._generate(embedding, size, self._sample(points))
        trace = {"points": points, "masks": masks} if self.trace is not None else None
        if trace is not None:
            self.trace.append(trace)
        if masks is None:
            return torch.zeros(size, device=query_image.device)
        merged = self._select(masks, points, cost, pool, feat_size, trace)
        return torch.as_tensor(merged, dtype=torch.float, device=query_image.device)[0]

    def _features(self, images01) -> torch.Tensor:
        """DINOv2 pre-norm patch tokens (no resize: its input is the episode's), L2 over
        channels: [n·N, C]."""
        tokens = self.dinov2(normalise_imagenet(images01))
        return F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=1, p=2)

    def _match(self, ref, tar, pool, feat_size, size):
        """patch_level_matching: forward and reverse bipartite matching, matched points."""
        from scipy.optimize import linear_sum_assignment

        similarity = ref @ tar.t()
        cost = (1 - similarity) / 2
        forward_s = similarity[pool.bool()]
        rows, cols = linear_sum_assignment(forward_s.cpu(), maximize=True)
        forward = [torch.as_tensor(i, dtype=torch.int64) for i in (rows, cols)]
        scores = forward_s[forward[0], forward[1]]
        in_mask = pool.nonzero()[:, 0]
        reverse = linear_sum_assignment(similarity.t()[forward[1]].cpu(), maximize=True)
        retain = torch.isin(torch.as_tensor(reverse[1], dtype=torch.int64), in_mask.cpu())
        if not (retain == False).all().item():  # noqa: E712 - the official test, kept
            forward = [forward[0][retain], forward[1][retain]]
            scores = scores[retain.to(scores.device)]
        kept = len(scores) // 2 if len(scores) > 40 else len(scores)
        order = torch.sort(scores, descending=True)[1][:kept]
        matched = forward[1][order.cpu()]
        unique = torch.tensor(list(set(matched.tolist())))
        xs = (unique % feat_size * self.dinov2.patch_size + self.dinov2.patch_size // 2).tolist()
        ys = (unique // feat_size * self.dinov2.patch_size + self.dinov2.patch_size // 2).tolist()
        points = [[int(x), int(y)] for x, y in zip(xs, ys) if int(x) < size[1] and int(y) < size[0]]
        return np.array(points), cost

    def _sample(self, points):
        """RobustPromptSampler.sample_points: subsets of 1…6 matched points."""
        samples = []
        low, high = self.sample_range
        for i in range(min(low, len(points)), min(high, len(points)) + 1):
            if len(points) > 8:
                index = [self.random.sample(range(len(points)), i)
                         for _ in range(self.max_iterations)]  # fmt: skip
            else:
                index = _combinations(len(points), i)
            samples.append(np.take(points, index, axis=0))
        return samples

    # -- SAM's automatic mask generator with Matcher's selected prompts ---------------------------
    def _generate(self, embedding, size, samples):
        """SamAutomaticMaskGenerator.generate (Matcher's): masks [M, 1, S, S] bool, in its order,
        or None when every mask is filtered out."""
        from segment_anything.utils.amg import MaskData, batch_iterator, build_point_grid
        from torchvision.ops.boxes import batched_nms

        data = MaskData()
        if self.dense:
            grid = build_point_grid(self.points_per_side) * np.array(size)[None, ::-1]
            for (points,) in batch_iterator(self.points_per_batch, grid):
                data.cat(self._dense_batch(embedding, size, points))
        for sample in samples:
            labels = np.ones(sample.shape[:2])
            for coords, marks in batch_iterator(self.points_per_batch, sample, labels):
                data.cat(self._selected_batch(embedding, size, coords, marks))
        if len(data._stats) == 0 or len(data["boxes"]) == 0:
            return None
        keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                           torch.zeros(len(data["boxes"]), device=data["boxes"].device),
                           iou_threshold=self.box_nms_thresh)  # fmt: skip
        data.filter(keep)
        return data["masks"][:, None]

    def _keep(self, masks, iou, iou_thresh, stability_thresh):
        from segment_anything.utils.amg import (
            MaskData,
            batched_mask_to_box,
            calculate_stability_score,
        )

        data = MaskData(masks=masks.flatten(0, 1), iou_preds=iou.flatten(0, 1))
        if iou_thresh > 0.0:
            data.filter(data["iou_preds"] > iou_thresh)
        data["stability_score"] = calculate_stability_score(
            data["masks"], self.sam.mask_threshold, 1.0
        )
        if stability_thresh > 0.0:
            data.filter(data["stability_score"] >= stability_thresh)
        data["masks"] = data["masks"] > self.sam.mask_threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        return data  # a full-image crop: no box touches a crop edge that is not the image's

    def _layers(self, masks, iou, layer):
        if layer in (0, 1, 2):
            return masks[:, layer][:, None], iou[:, layer][:, None]
        if layer in (3, 4, 5):
            return masks[:, layer - 3 :], iou[:, layer - 3 :]
        return masks, iou

    def _dense_batch(self, embedding, size, points):
        from segment_anything.utils.transforms import ResizeLongestSide

        side = self.sam.image_encoder.img_size
        moved = ResizeLongestSide(side).apply_coords(points, size)
        coords = torch.as_tensor(moved, device=embedding.device)  # float64, as the official
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        masks, iou, _ = prompted_logits(self.sam, embedding, size, coords[:, None, :],
                                        labels[:, None], self.dense_multimask)  # fmt: skip
        if self.sel_multimask:  # the official's flag (sic) selects the dense layers too
            masks, iou = self._layers(masks, iou, self.dense_output_layer)
        return self._keep(masks, iou, self.pred_iou_thresh, self.stability_score_thresh)

    def _selected_batch(self, embedding, size, points, labels):
        from segment_anything.utils.transforms import ResizeLongestSide

        side = self.sam.image_encoder.img_size
        moved = ResizeLongestSide(side).apply_coords(points, size)
        coords = torch.as_tensor(moved, dtype=torch.float, device=embedding.device)
        marks = torch.as_tensor(labels, dtype=torch.int, device=embedding.device)
        if coords.dim() == 2:
            coords, marks = coords[None], marks[None]
        masks, iou, _ = prompted_logits(
            self.sam, embedding, size, coords, marks, self.sel_multimask
        )
        if self.sel_multimask:
            masks, iou = self._layers(masks, iou, self.output_layer)
        return self._keep(masks, iou, self.iou_filter, self.sel_stability_score_thresh)

    # -- mask scores, filters and merging ----------------------------------------------------------
    def _select(self, masks, points, cost, pool, feat_size, trace):
        """Matcher.mask_generation after generate(): EMD, purity, coverage; filters; merge."""
        import ot

        masks = masks.cpu().numpy()
        count = len(masks)
        purity, coverage, emd = torch.zeros(count), torch.zeros(count), torch.zeros(count)
        patch = self.dinov2.patch_size
        support_rows = cost[pool.bool(), :]  # the masked support patches' costs, every mask
        for i in range(count):
            small = masks[i, 0].reshape(feat_size, patch, feat_size, patch).astype(np.float32)
            small = small.mean(axis=(1, 3))  # cv2.INTER_AREA by an integer factor: block means
            small = small > (small.max() - 1e-6 if small.max() <= 0 else 0)
            pooled = support_rows[:, torch.as_tensor(small.flatten())]
            n, m = pooled.shape
            emd[i] = 1 - ot.emd2(a=[1.0 / n] * n, b=[1.0 / m] * m, M=pooled.cpu().numpy())
            y = np.clip(points[:, 1].astype(int), 0, masks.shape[-2] - 1)
            x = np.clip(points[:, 0].astype(int), 0, masks.shape[-1] - 1)
            inside = int(masks[i, 0][y, x].sum())
            purity[i] = torch.tensor([inside / max(float(small.sum()), 1.0)]) + 1e-6
            coverage[i] = torch.tensor([inside / points.shape[0]]) + 1e-6
        if trace is not None:
            trace.update(emd=emd.clone(), purity=purity.clone(), coverage=coverage.clone())
        scores = self.alpha * emd + self.beta * purity * coverage**self.exp
        metrics = {"purity": purity, "coverage": coverage, "emd": emd}
        pred = masks[:, 0]
        for name in ("coverage", "emd", "purity"):
            if self.filters[name] > 0:
                threshold = min(self.filters[name], metrics[name].max())
                index = torch.where(metrics[name] >= threshold)[0]
                scores, pred = scores[index], _at_least_3d(pred[index])
                metrics = {k: v[index] for k, v in metrics.items()}
        if self.use_score_filter:
            distances, rank = torch.sort(1 - scores, descending=False)
            normed = (distances - distances.min()) / (distances.max() + 1e-6)
            chosen = distances < self.deep_score
            chosen[..., 0] = True
            chosen = chosen * (normed < self.deep_score_norm)
            picked = _at_least_3d(_at_least_3d(pred)[rank[chosen][: self.num_merging_mask]])
            return (picked.sum(0) > 0)[None]
        topk = min(self.num_merging_mask, scores.size(0))
        top = scores.topk(topk)[1]
        top_scores = scores[top].cpu().numpy()
        top_masks = _at_least_3d(pred[top])
        if self.topk_scores_threshold > 0:
            top_scores = top_scores / top_scores.max()
        keep = top_scores > self.topk_scores_threshold
        chosen = [m[None] for m in _at_least_3d(top_masks)[keep]]
        return _at_least_3d(np.sum(chosen, axis=0) > 0)


def _at_least_3d(masks):
    return masks[None, ...] if len(masks.shape) < 3 else masks


def _combinations(n: int, k: int) -> list:
    """RobustPromptSampler.combinations, in its order."""
    if k > n:
        return []
    if k == 0:
        return [[]]
    if k == n:
        return [list(range(n))]
    return [j + [i] for i in range(n) for j in _combinations(i, k - 1)]


@METHODS.register(display="Matcher")
def matcher(**kwargs) -> Matcher:
    """Matcher: DINOv2 bidirectional patch matching prompts SAM; masks scored by EMD, purity and
    coverage (its scripts/coco.sh settings by default); training-free."""
    return Matcher(**kwargs)
