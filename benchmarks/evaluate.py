"""Evaluation on fixed manifests, planned from them: every distinct image is encoded once per
model, episodes are scored in batches."""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from fsbench.benchmarks.metrics import SegmentationMeter, batched_confusion
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
        self.encode_seconds = 0.0  # time spent in the encoder (synchronised on CUDA)

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
        """Encode and store every id not stored yet (see `batches`)."""
        for _ in self.batches([i for i in image_ids if i not in self]):
            pass

    @torch.no_grad()
    def batches(self, image_ids, keep=None):
        """Yield (ids, features [n, C, h, w]) over `image_ids` (each once): stored ones first, in
        groups of `batch_size`, then the others as they are encoded, in batches of exactly
        `batch_size` (only the last one zero-padded). An encoded image is stored when
        `keep(id)` (default: always), so a plan can pass over images it needs only once.

        Convolution kernels pick their algorithm by input shape, so the same image encoded in a
        batch of 3 and in a batch of 16 differs in the last bits, and an argmax can flip. A fixed
        batch shape makes each image's features independent of which images share its batch, i.e.
        of how a scheduler grouped the evaluations (per-sample results do not depend on the
        batch's other members or their order).
        """
        ids = list(dict.fromkeys(image_ids))
        stored = [i for i in ids if i in self]
        for start in range(0, len(stored), self.batch_size):
            group = stored[start : start + self.batch_size]
            yield group, self.get(group)
        missing = [i for i in ids if i not in self]
        groups = [
            missing[start : start + self.batch_size]
            for start in range(0, len(missing), self.batch_size)
        ]
        # Decoding and resizing (PIL releases the GIL) run in threads, two batches ahead of the
        # encoder (bounded memory); the images and their order are the same as a plain loop's.
        upcoming = iter(groups)
        pending: deque = deque()
        with ThreadPoolExecutor(LOADER_THREADS) as pool:

            def submit():
                group = next(upcoming, None)
                if group is not None:
                    pending.append((group, [pool.submit(self.loader.image, i) for i in group]))

            submit()
            submit()
            while pending:
                group, futures = pending.popleft()
                submit()
                # float32 whatever the compute precision: stored and streamed maps are alike.
                features = self._encode_batch(torch.stack([f.result() for f in futures])).float()
                for image_id, feature in zip(group, features):
                    if keep is None or keep(image_id):
                        self._store(image_id, feature)
                self.encoded += len(group)
                yield group, features

    def _encode_batch(self, images) -> torch.Tensor:
        """Features of `images`, encoded in one batch of exactly `batch_size`."""
        count = len(images)
        if count < self.batch_size:
            padding = images.new_zeros((self.batch_size - count, *images.shape[1:]))
            images = torch.cat([images, padding])
        cuda = torch.device(self.device).type == "cuda"
        if cuda:
            images = images.pin_memory()
        started = time.perf_counter()
        features = self.model.encode_for_cache(images.to(self.device, non_blocking=True))[:count]
        if cuda:
            torch.cuda.synchronize(self.device)
        self.encode_seconds += time.perf_counter() - started
        return features

    def _store(self, image_id, feature) -> None:
        size = feature.numel() * 4
        if self._bytes + size <= self.max_bytes or not self._items:
            # A contiguous float32 copy: a view would pin the whole padded batch in memory.
            self._items[image_id] = feature.contiguous().clone()
            self._bytes += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="fsbench-features-", dir=self.spill_dir)
        data = feature.contiguous().cpu().numpy().tobytes()
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


class _Scorer:
    """Per-episode counts of one manifest, fed query by query in any order (counts are integers
    keyed by episode, so the order of scoring never changes them), plus the kept predictions."""

    def __init__(self, loader: EpisodeLoader, manifest, protocol, keep_predictions: int):
        self.loader, self.keep = loader, keep_predictions
        self.meter = SegmentationMeter(
            loader.dataset.fold_classes(manifest.spec["fold"]),
            only_present=protocol.only_present_classes,
        )
        self.original = protocol.score_resolution == "original"
        self.kept: dict[int, torch.Tensor] = {}

    def add(self, logits, labels, refs) -> None:
        """logits [M, 1+N, S, S] and labels [M, S, S] of M queries; refs: (episode index, spec,
        query index) of each."""
        if self.original:
            predictions = []
            for row, (episode, spec, q) in enumerate(refs):
                label = _scoring_label(self.loader.dataset, spec.query[q], spec.classes)
                label = label.to(logits.device)
                if self.loader.resize == "keep_ratio_pad":
                    # PFENet's test.py (ori_resize): the whole input's scores, bilinear with
                    # align_corners=True, onto the longer side's square, against the label
                    # padded there with 255 (so the padded part is never scored).
                    longer = max(label.shape)
                    scores = F.interpolate(
                        logits[row : row + 1],
                        size=(longer, longer),
                        mode="bilinear",
                        align_corners=True,
                    )[..., : label.shape[0], : label.shape[1]]
                else:
                    scores = F.interpolate(
                        logits[row : row + 1],
                        size=label.shape,
                        mode="bilinear",
                        align_corners=False,
                    )
                predictions.append(predicted_classes(scores)[0])
                self.meter.update(predictions[-1], label, spec.classes, episode)
        else:
            predictions = predicted_classes(logits)  # [M, S, S]
            matrices = batched_confusion(predictions, labels, logits.shape[1] - 1)
            for matrix, (episode, spec, _) in zip(matrices, refs):
                self.meter.add_confusion(matrix, spec.classes, episode)
        for prediction, (episode, _, q) in zip(predictions, refs):
            if episode < self.keep and q == 0:
                self.kept[episode] = prediction.cpu()

    def result(self):
        kept = [{"episode": e, "prediction": self.kept[e]} for e in sorted(self.kept)]
        return self.meter.counts(), kept


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
    `model(episode)`. The first query of the first `keep_predictions` episodes is returned too.
    """
    model.to(device).eval()
    started = time.perf_counter()
    scorer = _Scorer(loader, manifest, protocol, keep_predictions)
    use_cache = cache is not None and getattr(model, "cacheable_encoder", False)
    if chunk is None:
        chunk = _chunk_size(manifest, cache.feature_bytes) if use_cache else 1
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
            logits = model.predict_cached(
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
        refs = [
            (start + offset, spec, q)
            for offset, spec in enumerate(specs)
            for q in range(logits.shape[1])
        ]
        scorer.add(logits.flatten(0, 1), labels.flatten(0, 1), refs)
    counts, kept = scorer.result()
    return counts, time.perf_counter() - started, kept


def uses_prototypes(model) -> bool:
    """Whether the model's prediction factors through per-support prototypes (see
    `evaluate_prototypes`)."""
    return getattr(model, "cacheable_encoder", False) and hasattr(model, "prototype_logits")


@torch.no_grad()
def evaluate_prototypes(model, cache: FeatureCache, jobs, device="cpu", keep_predictions=0):
    """Evaluate `jobs` [(loader, manifest, protocol)] of one model whose prediction factors
    through per-support prototypes (`support_prototypes`, `prototype_logits`), in two passes
    over the distinct images, each image encoded once:

    1. every support image is encoded and pooled, once per (image, class set, index, annotation),
       into fg/bg prototypes of a few KB; its map is kept (in memory up to the cache's budget,
       then spilled) only if it is also a query;
    2. every query image is encoded (or read back once) and scored against the prototypes of all
       the episodes it is the query of, in every job.

    Memory is the prototypes plus the kept maps' budget, whatever the pool size; per episode
    only a few small matmuls remain. Returns [(counts, seconds, kept)] per job (the time split
    evenly: the work is shared).
    """
    started = time.perf_counter()
    model.to(device).eval()
    scorers = [_Scorer(loader, m, p, keep_predictions) for loader, m, p in jobs]
    # The plan: which support prototypes each image provides, and which queries it answers.
    pooling: dict[str, dict] = {}  # image → {key: (loader, index, classes)}
    answers: dict[str, list] = {}  # image → [(job, episode, spec, q)]
    for job, (loader, manifest, _) in enumerate(jobs):
        for episode, spec in enumerate(manifest.episodes):
            for index, ids in enumerate(spec.support):
                for image in ids:
                    key = loader.support_key(image, index, spec.classes)
                    pooling.setdefault(image, {})[key] = (loader, index, spec.classes)
            for q, image in enumerate(spec.query):
                answers.setdefault(image, []).append((job, episode, spec, q))
    prototypes: dict = {}
    for ids, features in cache.batches(list(pooling), keep=answers.__contains__):
        for image, feature in zip(ids, features):
            for key, (loader, index, classes) in pooling[image].items():
                fg, bg = loader.support_masks(image, index, list(classes))
                # One support at a time: its prototypes never depend on what else is pooled.
                prototypes[key] = model.support_prototypes(
                    feature[None], fg[None].to(device).float(), bg[None].to(device).float()
                )[0]
    for ids, features in cache.batches(list(answers), keep=lambda _: False):
        for image, feature in zip(ids, features):
            by_job: dict[int, list] = {}
            for job, episode, spec, q in answers[image]:
                by_job.setdefault(job, []).append((episode, spec, q))
            for job, refs in by_job.items():
                loader = jobs[job][0]
                pooled = torch.stack(
                    [_episode_prototypes(prototypes, loader, spec) for _, spec, _ in refs]
                )  # [R, N, K, 2, C]
                labels = torch.stack(
                    [loader.query_label(image, list(spec.classes)) for _, spec, _ in refs]
                ).to(device)
                logits = model.prototype_logits(feature[None], pooled[None], labels.shape[-2:])
                scorers[job].add(logits[0], labels, refs)
    seconds = (time.perf_counter() - started) / max(len(jobs), 1)
    return [(counts, seconds, kept) for counts, kept in (s.result() for s in scorers)]


def _episode_prototypes(prototypes: dict, loader, spec) -> torch.Tensor:
    """The pooled supports [N, K, 2, C] of one episode, from the per-support prototypes."""
    return torch.stack(
        [
            torch.stack([prototypes[loader.support_key(i, index, spec.classes)] for i in ids])
            for index, ids in enumerate(spec.support)
        ]
    )
