"""Evaluation on fixed manifests, encoding each distinct image once per model (DESIGN §9)."""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
import torch.nn.functional as F

from fsbench.benchmarks.metrics import EpisodeCounts, SegmentationMeter
from fsbench.datasets.episodes import EpisodeLoader


class FeatureCache:
    """image id → encoder features of one model, LRU-bounded in bytes; exact (no approximation)."""

    def __init__(self, model, loader: EpisodeLoader, device, max_bytes=2 << 30, batch_size=16):
        self.model, self.loader, self.device = model, loader, device
        self.max_bytes, self.batch_size = max_bytes, batch_size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.encoded = 0  # images pushed through the encoder (a re-encode after eviction counts)

    @torch.no_grad()
    def prefetch(self, image_ids) -> None:
        """Encode every id not cached yet, in batches of exactly `batch_size` (zero-padded).

        Convolution kernels pick their algorithm by input shape, so the same image encoded in a
        batch of 3 and in a batch of 16 differs in the last bits, and an argmax can flip. Which
        images are still missing depends on what the cache already holds, i.e. on how a scheduler
        grouped the evaluations; a fixed batch shape makes each image's features independent of
        that (per-sample results do not depend on the batch's other members or their order).
        """
        missing = list(dict.fromkeys(i for i in image_ids if i not in self._items))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            images = torch.stack([self.loader.image(i) for i in chunk])
            if len(chunk) < self.batch_size:
                padding = images.new_zeros((self.batch_size - len(chunk), *images.shape[1:]))
                images = torch.cat([images, padding])
            features = self.model.encode(images.to(self.device))[: len(chunk)]
            for image_id, feature in zip(chunk, features):
                self._store(image_id, feature.clone())
            self.encoded += len(chunk)

    def _store(self, image_id, feature) -> None:
        self._items[image_id] = feature
        self._bytes += feature.numel() * feature.element_size()
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()

    def get(self, image_ids) -> torch.Tensor:
        self.prefetch(image_ids)
        for image_id in image_ids:
            self._items.move_to_end(image_id)
        return torch.stack([self._items[i] for i in image_ids])


def _scoring_label(dataset, image_id, classes) -> torch.Tensor:
    """The query's label at original resolution, in episode indices (protocols scoring there)."""
    masks, void = dataset.load_masks(image_id, list(classes))
    target = torch.zeros(void.shape, dtype=torch.long)
    target[torch.from_numpy(void)] = 255
    for index, mask in enumerate(masks, start=1):
        target[torch.from_numpy(mask)] = index
    return target


@torch.no_grad()
def evaluate(
    model,
    loader: EpisodeLoader,
    manifest,
    protocol,
    device="cpu",
    cache=None,
    chunk=32,
    keep_predictions: int = 0,
):
    """Per-episode counts of `model` on every episode of `manifest`, plus timing.

    `cache` (a FeatureCache of this model) makes the encoder run once per distinct image; without
    one, or for methods whose encoder depends on the episode, each episode runs `model(episode)`.
    """
    model.to(device).eval()
    started = time.perf_counter()
    meter = SegmentationMeter(
        loader.dataset.fold_classes(manifest.spec["fold"]),
        only_present=protocol.only_present_classes,
    )
    use_cache = cache is not None and getattr(model, "cacheable_encoder", False)
    kept = []
    for start in range(0, len(manifest.episodes), chunk):
        specs = manifest.episodes[start : start + chunk]
        if use_cache:
            cache.prefetch(i for s in specs for i in (*sum(s.support, ()), *s.query))
        for offset, spec in enumerate(specs):
            index = start + offset
            episode = loader.load(spec).to(device)
            if use_cache:
                way, shot = episode.support_fg.shape[:2]
                support = cache.get([i for ids in spec.support for i in ids]).unflatten(
                    0, (way, shot)
                )
                logits = model.predict(
                    support,
                    episode.support_fg,
                    episode.support_bg,
                    cache.get(list(spec.query)),
                    episode.query_labels.shape[-2:],
                )
            else:
                logits = model(episode)
            for query, query_id in enumerate(spec.query):
                if protocol.score_resolution == "original":
                    label = _scoring_label(loader.dataset, query_id, spec.classes)
                    height, width = loader.content_size(*label.shape)  # drop any padding
                    scores = F.interpolate(
                        logits[query : query + 1, :, :height, :width],
                        size=label.shape,
                        mode="bilinear",
                        align_corners=False,
                    )[0]
                else:
                    label, scores = episode.query_labels[query], logits[query]
                prediction = scores.argmax(0)
                meter.update(prediction, label, spec.classes, index)
                if len(kept) < keep_predictions:
                    kept.append({"episode": index, "prediction": prediction.cpu()})
    counts: EpisodeCounts = meter.counts()
    return counts, time.perf_counter() - started, kept
