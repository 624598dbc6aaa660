"""The method contract: what a few-shot segmentation method is to fsbench.

A method is an `nn.Module` subclassing `FewShotMethod`. Its class declares, as attributes read
without building it, how the engine may split its computation; `evaluation_path()` turns them
into the one evaluation dispatch (no `hasattr` anywhere):

- `"episode"` (the default): `forward(episode)` per episode; nothing is cached.
- `"features"` (`cacheable_encoder = True`): `encode(images)` does not depend on the episode
  nor on an image's role, so each distinct image is encoded once per model and episodes are
  predicted in batches by `predict_batch` from the cached encodings and the masks (SG-One,
  CANet, the fine-tuning baselines).
- `"support_states"` (also `support_states = True`): everything an episode needs from a support
  image under a mask is `support_state(encodings, fg, bg)`, computed once per (image, mask,
  annotation) and kept while the encodings are not (PANet: fg/bg prototypes of a few KB;
  PFENet: masked layer-4 features and prior inputs; HSNet: its masked pyramid); queries are then
  scored in image order by `predict_states(query encoding, support states)`.

Other declarations:
- `trainable`: whether `loss(episode)` trains it (untrained methods are evaluated directly);
- `output_kind`: `"logits"` [Q, 1+N, H, W] (argmax taken by the engine) or `"labels"` [Q, H, W]
  (long, episode indices: e.g. HSNet's k-shot vote), scored as labels everywhere;
- `feature_layout`: `"map"` (encode returns one [B, C, h, w] tensor) or `"maps"` (a tuple, e.g.
  a feature pyramid; cached as one flat vector per image and unpacked before the method sees it);
- `batched_loss`: `loss_batch(episodes)` computes one loss over several episodes as a true batch
  (BatchNorm layers that train need it when a recipe asks for `episodes_per_step` > 1);
- `input_size_problem(size)`: None when an S×S input fits, else the rule and sizes that fit;
  checked when a grid is expanded, so a misfit is one line, never a traceback in a worker;
- `base_class_labels`: training episodes carry `query_base_labels` (the query's label map over
  the fold's training classes, 1…B in ascending class-id order) and `sampler: images` stages
  feed `loss_images(ImageBatch)`: what a base learner trains on;
- `default_stages()`: the method's training stages (a grid's `train: {stages: …}` overrides
  them); `model.stage` holds the running stage's name;
- `model_per_shot`: the builder takes `shot` (the shot the model is trained at, passed by the
  engine unless the entry's kwargs set it) and each shot has its own model, released or
  trained (BAM/HDMNet: a k-shot re-weighting layer exists only for K > 1);
- `kwargs_problem(kwargs, fold)`: None, or one sentence on why these kwargs cannot serve this
  fold (e.g. another fold's base-learner file); checked when a grid is expanded;
- `version`: a string naming the method's code version (None: unversioned). When set it joins
  every cell id, so results computed by an earlier version of the code are never reused: bump
  it when an edit changes what the method computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode

EVALUATION_PATHS = ("episode", "features", "support_states")
OUTPUT_KINDS = ("logits", "labels")
FEATURE_LAYOUTS = ("map", "maps")


class FewShotMethod(nn.Module):
    """Base of every method: `model(episode)` → logits [Q, 1+N, H, W] (or labels [Q, H, W]);
    `model.loss(episode)` → {"total": …, other terms}. See the module docstring."""

    trainable = True
    cacheable_encoder = False
    support_states = False
    output_kind = "logits"
    feature_layout = "map"
    batched_loss = False
    base_class_labels = False
    model_per_shot = False
    version: str | None = None
    # Data its weights saw beyond ImageNet (e.g. SAM: "SA-1B"): tables mark such rows with a
    # dagger, and a grid's `strict: true` keeps them out.
    pretraining: tuple[str, ...] = ()
    # What an episode costs, declared (the report's cost table measures it): e.g. the encoder
    # passes per image and the decoder passes per episode of a foundation-model method.
    cost: str = ""
    stage: str | None = None  # the training stage running (set by the trainer before its steps)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        problems = []
        if cls.version is not None and (not isinstance(cls.version, str) or not cls.version):
            problems.append(f"version {cls.version!r} (a non-empty string, or None)")
        if cls.output_kind not in OUTPUT_KINDS:
            problems.append(f"output_kind {cls.output_kind!r} (one of {OUTPUT_KINDS})")
        if cls.feature_layout not in FEATURE_LAYOUTS:
            problems.append(f"feature_layout {cls.feature_layout!r} (one of {FEATURE_LAYOUTS})")
        if cls.support_states and not cls.cacheable_encoder:
            problems.append("support_states needs cacheable_encoder (states come from encodings)")
        if problems:
            raise FsbenchError(f"method class {cls.__name__}: " + "; ".join(problems))

    @classmethod
    def evaluation_path(cls) -> str:
        """How the evaluator runs this method: one of EVALUATION_PATHS, from the declarations."""
        if cls.support_states:
            return "support_states"
        return "features" if cls.cacheable_encoder else "episode"

    @classmethod
    def input_size_problem(cls, size: int) -> str | None:
        """None when the method takes an S×S input (S = `size`); else one sentence: the rule
        and the nearest sizes that fit. Default: any size."""
        return None

    @classmethod
    def kwargs_problem(cls, kwargs: dict, fold: int) -> str | None:
        """None when the entry's kwargs can serve the fold; else one sentence naming the
        problem and the fix (checked when a grid is expanded). Default: nothing to check."""
        return None

    # -- training ----------------------------------------------------------------------------
    @classmethod
    def default_stages(cls) -> tuple[dict, ...]:
        """The method's training stages when it trains in several (e.g. a base learner on
        image batches, then a meta learner on episodes): each a dict of TrainConfig keys plus
        `name` and `params` (the `param_groups()` it trains). A grid's `train: {stages: …}`
        overrides them; () (the default): one stage, the grid's `train:`."""
        return ()

    def loss(self, episode: Episode) -> dict[str, torch.Tensor]:
        raise FsbenchError(f"method {type(self).__name__} is not trained; leave it out of training")

    def param_groups(self) -> dict[str, list]:
        """Named parameter groups for a recipe's `lr_mult` and `batchnorm` (empty: one group,
        "all")."""
        return {}

    def init_from(self, model) -> None:
        """Start from another entry's trained model (a grid's `init_from:`), e.g. take over a
        base learner's weights before this method's own stages train."""
        raise FsbenchError(
            f"method {type(self).__name__} does not start from another model (init_from); "
            "implement init_from(model) or drop init_from from its entry"
        )

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Weights released by the method's official code (`format: official`)."""
        raise FsbenchError(
            f"method {type(self).__name__} has no official checkpoint format; use format: fsbench"
        )

    def loss_images(self, batch) -> dict[str, torch.Tensor]:
        """The loss of a batch of training images with base-class labels (`ImageBatch`: a
        `sampler: images` stage, e.g. a base learner's); needs `base_class_labels = True`."""
        raise FsbenchError(
            f"method {type(self).__name__} does not train on image batches (loss_images); use "
            "an episode sampler for this stage"
        )

    def loss_batch(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """One loss over several episodes as a true batch (`batched_loss = True` methods)."""
        raise FsbenchError(
            f"method {type(self).__name__} has no batched loss; with episodes_per_step > 1 its "
            "gradients are accumulated episode by episode (BatchNorm must not train then)"
        )

    def begin_episodes(self) -> None:
        """Called before a manifest's episodes run in order on the `episode` path (e.g. a method
        whose official sampler carries a generator from episode to episode resets it here)."""

    # -- encodings ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor):
        """[B, 3, H, W] → encodings (one map, or a tuple of maps for the "maps" layout)."""
        raise FsbenchError(f"method {type(self).__name__} declares no cacheable encoder")

    def encode_episode(self, episode: Episode):
        """Supports and queries through `encode` in one batch: ([N,K,C,h,w], [Q,C,h,w]) (of
        each map, for the "maps" layout)."""
        way, shot = episode.support_fg.shape[:2]
        features = self.encode(
            torch.cat([episode.support_images.flatten(0, 1), episode.query_images])
        )
        support = per_map(features, lambda f: f[: way * shot].unflatten(0, (way, shot)))
        return support, per_map(features, lambda f: f[way * shot :])

    def encode_for_cache(self, images: torch.Tensor) -> torch.Tensor:
        """`encode` as the evaluator's cache stores it: one tensor [B, C, h, w] per batch (the
        "maps" layout flattened into [B, D, 1, 1]; `unpack` restores it)."""
        features = self.encode(images)
        if self.feature_layout == "map":
            return features
        self._map_shapes = tuple(tuple(f.shape[1:]) for f in features)
        return torch.cat([f.flatten(1) for f in features], 1)[:, :, None, None]

    def unpack(self, cached: torch.Tensor):
        """Encodings as `encode` returned them, from the cache's form [..., D, 1, 1] (any
        leading dims); the "map" layout is returned as it is."""
        if self.feature_layout == "map":
            return cached
        flat, maps, start = cached.flatten(-3), [], 0
        for shape in self._map_shapes:
            size = math.prod(shape)
            maps.append(flat[..., start : start + size].unflatten(-1, shape))
            start += size
        return tuple(maps)

    # -- the "features" path -----------------------------------------------------------------
    def predict_cached(self, support_features, support_fg, support_bg, query_features, out_size):
        """`predict_batch` on features as `encode_for_cache` made them."""
        return self.predict_batch(
            self.unpack(support_features),
            support_fg,
            support_bg,
            self.unpack(query_features),
            out_size,
        )

    def predict(self, support_features, support_fg, support_bg, query_features, out_size):
        """Output of one episode from its encodings: supports [N,K,…], masks [N,K,H,W],
        queries [Q,…]."""
        raise FsbenchError(f"method {type(self).__name__} has no predict()")

    def predict_batch(self, support_features, support_fg, support_bg, query_features, out_size):
        """Outputs [B, Q, …] of B episodes at once: supports [B,N,K,C,h,w], masks [B,N,K,H,W],
        queries [B,Q,C,h,w] (tuples of them for the "maps" layout). Methods whose prediction
        vectorises override it."""
        episodes = zip(
            per_episode(support_features), support_fg, support_bg, per_episode(query_features)
        )
        return torch.stack([self.predict(*episode, out_size) for episode in episodes])

    # -- the "support_states" path -----------------------------------------------------------
    def support_state(self, support_features, support_fg, support_bg) -> torch.Tensor:
        """States [n, …] of n supports: encodings [n, …] (tuples for "maps") under masks
        [n, H, W]; one support's state never depends on the others'."""
        raise FsbenchError(f"method {type(self).__name__} declares no support state")

    def predict_states(self, query_features, support_states, out_size) -> torch.Tensor:
        """Outputs [Q, R, …] of queries [Q, …] (tuples for "maps"), each against R episodes'
        support states [Q, R, N, K, …] (R = the episodes a query image answers)."""
        raise FsbenchError(f"method {type(self).__name__} declares no support state")

    def forward(self, episode: Episode) -> torch.Tensor:
        """Encoder + prediction: the same computation the evaluator's cached paths run."""
        support, query = self.encode_episode(episode)
        out_size = episode.query_labels.shape[-2:]
        if self.support_states:
            way, shot = episode.support_fg.shape[:2]
            states = self.support_state(
                per_map(support, lambda f: f.flatten(0, 1)),
                episode.support_fg.flatten(0, 1),
                episode.support_bg.flatten(0, 1),
            )
            states = states.unflatten(0, (way, shot))
            queries = episode.query_images.shape[0]
            states = states[None, None].expand(queries, 1, *states.shape)
            return self.predict_states(query, states, out_size)[:, 0]
        return self.predict(support, episode.support_fg, episode.support_bg, query, out_size)


def labels_of(output: torch.Tensor, output_kind: str) -> torch.Tensor:
    """Predicted episode indices [M, H, W] of a method's output [M, 1+N, H, W] (logits: argmax;
    1-way as `fg > bg`, ties to background as argmax's first index; N-way in channels-last
    layout, a contiguous reduction) or [M, H, W] (labels: as they are)."""
    if output_kind == "labels":
        return output.long()
    if output.shape[1] == 2:
        return (output[:, 1] > output[:, 0]).long()
    return output.permute(0, 2, 3, 1).argmax(-1)


def resize_output(output: torch.Tensor, size, output_kind: str, align_corners: bool):
    """A method's output [M, …] resized to `size`: logits bilinearly, labels by nearest."""
    if output_kind == "labels":
        return F.interpolate(output[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return F.interpolate(output, size=size, mode="bilinear", align_corners=align_corners)


def per_map(features, function):
    """`function` of the features, or of each map of a "maps" layout."""
    if isinstance(features, (tuple, list)):
        return tuple(function(f) for f in features)
    return function(features)


def per_episode(features) -> list:
    """The per-episode items of batched features [B, ...] (tuples of maps kept together)."""
    if isinstance(features, (tuple, list)):
        return list(zip(*features))
    return list(features)
