"""The feature cache of one model's evaluation: every distinct image of the planned manifests is
encoded once, kept in memory up to a byte budget and spilled beyond it to a file under the
results' cache folder, up to a disk budget (`spill_bytes`); `plan_fits` says beforehand whether
a plan fits both, so an evaluation that cannot is run episode by episode instead."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader

LOADER_THREADS = 4
# Without a disk budget, a spill may use this share of the free space where it spills.
FREE_SPACE_SHARE = 0.5


def default_spill_bytes(spill_dir) -> int:
    """Half the free space of the spill folder's disk (checked when the evaluation starts)."""
    folder = spill_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return int(shutil.disk_usage(folder).free * FREE_SPACE_SHARE)


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
    float32 and read back with `pread` (never mapped, so it never counts as resident memory), up
    to `spill_bytes` on disk (`spill_dir`: the results' cache folder; a temporary file there,
    removed when closed).
    Exact: a spilled map is the same bits as the encoder's output. Nothing is evicted, so a
    get of any ids never re-encodes."""

    def __init__(
        self,
        model,
        loader: EpisodeLoader,
        device,
        max_bytes=2 << 30,
        batch_size=16,
        spill_dir=None,
        spill_bytes: int | None = None,
    ):
        self.model, self.loader, self.device = model, loader, device
        self.max_bytes, self.batch_size = max_bytes, batch_size
        self.spill_dir = str(spill_dir) if spill_dir else None
        self.spill_bytes = (
            default_spill_bytes(self.spill_dir) if spill_bytes is None else spill_bytes
        )
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
    def peak_spill_bytes(self) -> int:
        """Bytes written to the spill file (it only grows: the peak disk use)."""
        return self._end

    def plan_fits(self, stored: int) -> bool:
        """Whether `stored` encodings fit the memory and disk budgets (the size of one is known
        once an image has been encoded)."""
        one = self.feature_bytes or 0
        return stored * one <= self.max_bytes + self.spill_bytes + one

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
        if self._end + size > self.spill_bytes:
            raise FsbenchError(
                f"the feature cache would spill more than spill_bytes={self.spill_bytes} to "
                f"{self.spill_dir or tempfile.gettempdir()}; raise spill_bytes or cache_bytes"
            )
        if self._file is None:
            if self.spill_dir:
                os.makedirs(self.spill_dir, exist_ok=True)
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
