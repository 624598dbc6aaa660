"""A plugin method that needs what HSNet needs from the engine: a support state computed with the
mask (per-shot prototypes), label outputs (a k-shot vote, as HSNet's `predict_mask_nshot`), a
multi-map encoding (two scales) and an input-size rule. It is one file, named by a grid's
`imports:`; nothing of fsbench is edited to add it."""

import torch
import torch.nn.functional as F

from fsbench import register_method
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import masked_average_pool


class ShotVote(FewShotMethod):
    """Each shot predicts alone (cosine to its own fg/bg prototypes, summed over two scales);
    a pixel is a class's where that class's votes, over the maximum vote, reach 0.5."""

    trainable = True
    cacheable_encoder = True
    support_states = True
    output_kind = "labels"
    feature_layout = "maps"

    def __init__(self, channels=8):
        super().__init__()
        self.fine = torch.nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.coarse = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    @classmethod
    def input_size_problem(cls, size):
        if size % 8:
            lower, upper = size - size % 8, size - size % 8 + 8
            return f"needs a multiple of 8 (stride 8): {lower} or {upper} fit"
        return None

    def encode(self, images):
        fine = torch.relu(self.fine(images))
        return fine, self.coarse(fine)

    def support_state(self, support_features, support_fg, support_bg):
        """[n, 2, 2, C]: (scale, fg/bg) prototypes of each support."""
        return torch.stack(
            [
                torch.stack(
                    [masked_average_pool(f, support_fg), masked_average_pool(f, support_bg)], 1
                )
                for f in support_features
            ],
            1,
        )

    def _shot_scores(self, query_features, states, out_size):
        """fg − bg cosine [Q, R, N, K, H, W] of each query against each shot's prototypes."""
        total = 0
        for scale, query in enumerate(query_features):  # [Q, C, h, w]
            prototypes = F.normalize(states[..., scale, :, :], dim=-1)  # [Q, R, N, K, 2, C]
            scores = torch.einsum("qchw,qrnkpc->qrnkphw", F.normalize(query, dim=1), prototypes)
            difference = scores[..., 0, :, :] - scores[..., 1, :, :]
            shape = difference.shape[:-2]
            total = total + F.interpolate(
                difference.flatten(0, 3)[:, None], size=out_size, mode="bilinear"
            )[:, 0].unflatten(0, shape)
        return total

    def predict_states(self, query_features, support_states, out_size):
        votes = (self._shot_scores(query_features, support_states, out_size) > 0).sum(3).float()
        share = votes / votes.flatten(-2).amax(-1).clamp_min(1)[..., None, None]  # [Q,R,N,H,W]
        best = share.argmax(2)
        return torch.where(share.amax(2) >= 0.5, best + 1, torch.zeros_like(best))

    def loss(self, episode):
        support, query = self.encode_episode(episode)
        way, shot = episode.support_fg.shape[:2]
        states = self.support_state(
            tuple(f.flatten(0, 1) for f in support),
            episode.support_fg.flatten(0, 1),
            episode.support_bg.flatten(0, 1),
        ).unflatten(0, (way, shot))
        queries = episode.query_images.shape[0]
        states = states[None, None].expand(queries, 1, *states.shape)
        scores = self._shot_scores(query, states, episode.query_labels.shape[-2:])[:, 0]
        logits = torch.cat([torch.zeros_like(scores[:, :1, 0]), scores.mean(2)], 1) * 10
        return {"total": F.cross_entropy(logits, episode.query_labels, ignore_index=255)}


@register_method()
def shot_vote(channels=8) -> ShotVote:
    """Per-shot prototypes, k-shot vote as labels (a test plugin shaped like HSNet)."""
    return ShotVote(channels)
