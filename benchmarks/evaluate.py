"""Evaluation on fixed manifests, planned from them: every distinct image is encoded once per
model, episodes are scored in batches (DESIGN §9)."""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from fsbench.benchmarks.metrics import EpisodeCounts, SegmentationMeter, batched_confusion
from fsbench.datasets.episodes import EpisodeLoader

# Feature bytes of one chunk of episodes gathered at once (supports + queries).
CHUNK_BYTES = 256 << 20
MAX_CHUNK = 64
LOADER_THREADS = 4


def distinct_images(manifests) -> list[str]:
    """Every image of the manifests once, in order of first use (supports, then queries)."""
    seen: dict[str, None] = {}
    for manifest in manifests:
        for spec in manifest.episodes:
            for ids in spec.support:
                seen.update(dict.fromkeys(ids))
            seen.update(dict.fromkeys(spec.query))
    return list(seen)


class FeatureCache:
    """image id → encoder features of one model. Each image is encoded once: features stay in
    memory (on the model's device) up to `max_bytes`, the rest is written to a temporary file in
    float32 and read back with `pread` (never mapped, so it never counts as resident memory).
    Exact: a spilled map is the same bits as the encoder's output. Nothing is evicted, so a
    get of any ids never re-encodes."""

    def __init__(
        self, model, loader: EpisodeLoader, device, max_bytes=2 << 30, batch_size=16, spill_dir=None
    ):
        self.model, self.loader, self.device = model, loader, device
        self.max_bytes, self.batch_size = max_bytes, batch_size
        self.spill_dir = spill_dir
        self._items: dict[str, torch.Tensor] = {}  # in memory
        self._spilled: dict[str, tuple[int, tuple[int, ...]]] = {}  # id → (offset, shape)
        self._bytes = 0
        self._file = None
        self._end = 0
        self.encoded = 0  # images pushed through the encoder

    def __contains__(self, image_id) -> bool:
        return image_id in self._items or image_id in self._spilled

    def __len__(self) -> int:
        return len(self._items) + len(self._spilled)

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    @property
    def feature_bytes(self) -> int | None:
        """Bytes of one stored map (None while empty)."""
        first = next(iter(self._items.values()), None)
        return None if first is None else first.numel() * 4

    @torch.no_grad()
    def prefetch(self, image_ids) -> None:
        """Encode every id not stored yet, in batches of exactly `batch_size` (only the last one
        zero-padded).

        Convolution kernels pick their algorithm by input shape, so the same image encoded in a
        batch of 3 and in a batch of 16 differs in the last bits, and an argmax can flip. A fixed
        batch shape makes each image's features independent of which images share its batch, i.e.
        of how a scheduler grouped the evaluations (per-sample results do not depend on the
        batch's other members or their order).
        """
        missing = list(dict.fromkeys(i for i in image_ids if i not in self))
        batches = [
            missing[start : start + self.batch_size]
            for start in range(0, len(missing), self.batch_size)
        ]
        # Decoding and resizing (PIL releases the GIL) run in threads, two batches ahead of the
        # encoder (bounded memory); the images and their order are the same as a plain loop's.
        upcoming = iter(batches)
        pending: deque = deque()
        with ThreadPoolExecutor(LOADER_THREADS) as pool:

            def submit():
                ids = next(upcoming, None)
                if ids is not None:
                    pending.append((ids, [pool.submit(self.loader.image, i) for i in ids]))

            submit()
            submit()
            while pending:
                ids, futures = pending.popleft()
                submit()
                self._encode_batch(ids, torch.stack([f.result() for f in futures]))

    def _encode_batch(self, chunk, images) -> None:
        if len(chunk) < self.batch_size:
            padding = images.new_zeros((self.batch_size - len(chunk), *images.shape[1:]))
            images = torch.cat([images, padding])
        if torch.device(self.device).type == "cuda":
            images = images.pin_memory()
        features = self.model.encode(images.to(self.device, non_blocking=True))
        for image_id, feature in zip(chunk, features[: len(chunk)]):
            self._store(image_id, feature)
        self.encoded += len(chunk)

    def _store(self, image_id, feature) -> None:
        size = feature.numel() * 4
        if self._bytes + size <= self.max_bytes or not self._items:
            # A contiguous float32 copy: a view would pin the whole padded batch in memory.
            self._items[image_id] = feature.float().contiguous().clone()
            self._bytes += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="fsbench-features-", dir=self.spill_dir)
        data = feature.float().contiguous().cpu().numpy().tobytes()
        os.pwrite(self._file.fileno(), data, self._end)
        self._spilled[image_id] = (self._end, tuple(feature.shape))
        self._end += len(data)

    def get(self, image_ids) -> torch.Tensor:
        """Features [n, C, h, w] of `image_ids` (encoding those not stored yet), gathered into one
        buffer: a spilled map is read straight into its slot, with no intermediate copies."""
        self.prefetch(image_ids)
        first = next(iter(self._items.values()))  # the first stored map always stays in memory
        out = first.new_empty((len(image_ids), *first.shape))
        for slot, image_id in zip(out, image_ids):
            if image_id in self._items:
                slot.copy_(self._items[image_id])
                continue
            host = slot if slot.device.type == "cpu" else torch.empty_like(slot, device="cpu")
            offset, _ = self._spilled[image_id]
            os.preadv(self._file.fileno(), [host.numpy().reshape(-1).view(np.uint8)], offset)
            if host is not slot:
                slot.copy_(host)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _scoring_label(dataset, image_id, classes) -> torch.Tensor:
    """The query's label at original resolution, in episode indices (protocols scoring there)."""
    masks, void = dataset.load_masks(image_id, list(classes))
    target = torch.zeros(void.shape, dtype=torch.long)
    target[torch.from_numpy(void)] = 255
    for index, mask in enumerate(masks, start=1):
        target[torch.from_numpy(mask)] = index
    return target


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over dim 1 of [M, 1+N, H, W]; 1-way as `fg > bg` (ties go to background, as
    argmax's first index), N-way in channels-last layout (a contiguous reduction)."""
    if logits.shape[1] == 2:
        return (logits[:, 1] > logits[:, 0]).long()
    return logits.permute(0, 2, 3, 1).argmax(-1)


def _chunk_size(manifest, feature_bytes: int | None) -> int:
    """Episodes per batch: as many as keep their gathered features under CHUNK_BYTES."""
    if not manifest.episodes or not feature_bytes:
        return 16
    first = manifest.episodes[0]
    per_episode = (sum(len(s) for s in first.support) + len(first.query)) * feature_bytes
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // max(per_episode, 1))))


@torch.no_grad()
def evaluate(
    model,
    loader: EpisodeLoader,
    manifest,
    protocol,
    device="cpu",
    cache=None,
    chunk=None,
    keep_predictions: int = 0,
):
    """Per-episode counts of `model` on every episode of `manifest`, plus timing.

    With `cache` (a FeatureCache of this model) the encoder runs once per distinct image and
    episodes are predicted in batches from cached features and masks (images are never loaded);
    without one, or for methods whose encoder depends on the episode, each episode runs
    `model(episode)`.
    """
    model.to(device).eval()
    started = time.perf_counter()
    meter = SegmentationMeter(
        loader.dataset.fold_classes(manifest.spec["fold"]),
        only_present=protocol.only_present_classes,
    )
    use_cache = cache is not None and getattr(model, "cacheable_encoder", False)
    original = protocol.score_resolution == "original"
    if chunk is None:
        chunk = _chunk_size(manifest, cache.feature_bytes) if use_cache else 1
    kept = []
    for start in range(0, len(manifest.episodes), chunk):
        specs = manifest.episodes[start : start + chunk]
        if use_cache:
            masks = [loader.load_masks(spec) for spec in specs]
            support_fg = torch.stack([m[0] for m in masks]).to(device)
            support_bg = torch.stack([m[1] for m in masks]).to(device)
            labels = torch.stack([m[2] for m in masks]).to(device)  # [B, Q, S, S]
            way, shot = support_fg.shape[1:3]
            support = cache.get([i for s in specs for ids in s.support for i in ids])
            query = cache.get([i for s in specs for i in s.query])
            logits = model.predict_batch(
                support.unflatten(0, (len(specs), way, shot)),
                support_fg,
                support_bg,
                query.unflatten(0, (len(specs), -1)),
                labels.shape[-2:],
            )  # [B, Q, 1+N, S, S]
        else:
            episodes = [loader.load(spec).to(device) for spec in specs]
            logits = torch.stack([model(e) for e in episodes])
            labels = torch.stack([e.query_labels for e in episodes])
        queries = logits.shape[1]
        if original:
            for offset, spec in enumerate(specs):
                for q, query_id in enumerate(spec.query):
                    label = _scoring_label(loader.dataset, query_id, spec.classes).to(device)
                    height, width = loader.content_size(*label.shape)  # drop any padding
                    scores = F.interpolate(
                        logits[offset, q : q + 1, :, :height, :width],
                        size=label.shape,
                        mode="bilinear",
                        align_corners=False,
                    )
                    prediction = predicted_classes(scores)[0]
                    meter.update(prediction, label, spec.classes, start + offset)
                    if len(kept) < keep_predictions:
                        kept.append({"episode": start + offset, "prediction": prediction.cpu()})
            continue
        predictions = predicted_classes(logits.flatten(0, 1))  # [B·Q, S, S]
        matrices = batched_confusion(predictions, labels.flatten(0, 1), logits.shape[2] - 1)
        for offset, spec in enumerate(specs):
            for q in range(queries):
                meter.add_confusion(matrices[offset * queries + q], spec.classes, start + offset)
        for offset in range(len(specs)):
            if len(kept) < keep_predictions:
                kept.append(
                    {"episode": start + offset, "prediction": predictions[offset * queries].cpu()}
                )
    counts: EpisodeCounts = meter.counts()
    return counts, time.perf_counter() - started, kept
