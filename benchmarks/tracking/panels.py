"""A cell's kept episodes as image panels (support + mask, query + prediction, query + ground
truth) in the network's input frame: the data of the report's qualitative figure and the PNG each
MLflow cell run carries (composed with numpy: milliseconds, not matplotlib's ~0.8 s). Imports
neither torch nor matplotlib."""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.benchmarks.store.records import CellRecord
from fsbench.core import FsbenchError, manifest_fingerprint
from fsbench.datasets.registry import DATASETS, dataset_class
from fsbench.datasets.resize import fit
from fsbench.datasets.synthetic import existing_only


def class_names(dataset: str) -> dict[int, str]:
    """Class id → name of a dataset (by registry name), from its class; {} when undeclared."""
    return dict(enumerate(getattr(dataset_class(dataset), "class_names", ()), start=1))


def input_view(dataset, image_id, classes, size, resize):
    """An image and its first class's mask in the network's input frame (EpisodeLoader's
    geometry, padding black), so predictions line up."""
    mask = dataset.load_masks(image_id, classes)[0][0].astype(np.uint8)
    pixels = fit(dataset.load_image(image_id), size, resize, Image.BILINEAR, 0)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)  # keep_ratio_pad gives floats
    return pixels, fit(mask, size, resize, Image.NEAREST, 0) > 0


_VERIFIED: OrderedDict = OrderedDict()  # (file, mtime, size, fingerprint) → its episodes
_VERIFIED_LOCK = threading.Lock()


def verified_episodes(manifest_file: Path, fingerprint: str) -> list[dict]:
    """The episodes of a seed's manifest file when it is intact and is the one the seed was
    scored on; [] otherwise (missing, edited, or another manifest: the next `run` rewrites it),
    so rows go without image ids rather than with wrong ones. The last few files read are kept
    (keyed by their modification time and size): the cells of a grid share a handful of
    manifests, and re-reading and re-hashing a 1000-episode manifest cost more than logging."""
    try:
        stat = manifest_file.stat()
        key = (str(manifest_file), stat.st_mtime_ns, stat.st_size, fingerprint)
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                _VERIFIED.move_to_end(key)
                return _VERIFIED[key]
        raw = json.loads(manifest_file.read_text())
        spec = {k: v for k, v in raw.items() if k not in ("fingerprint", "episodes")}
        intact = manifest_fingerprint(spec, raw["episodes"]) == fingerprint
        episodes = raw["episodes"] if intact else []
        with _VERIFIED_LOCK:
            _VERIFIED[key] = episodes
            while len(_VERIFIED) > 16:
                _VERIFIED.popitem(last=False)
        return episodes
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


_OPENED: dict = {}  # datasets opened for figures, by config


def qualitative_rows(result: CellRecord, store, max_episodes: int):
    """[(spec, [(image, mask, title) × 3])] for the cell's saved episodes: support + mask,
    query + prediction, query + ground truth (None when the dataset cannot be opened)."""
    kept = result.qualitative
    if not kept:
        return None
    config = result.config
    key = json.dumps([config.dataset, config.scored_under], sort_keys=True)
    try:
        if key not in _OPENED:  # one dataset object per process (logging draws one per cell)
            with existing_only():  # a report reads results: it never generates a dataset
                _OPENED[key] = DATASETS.build(
                    config.dataset_name,
                    protocol=config.scored_under,
                    **{k: v for k, v in config.dataset.items() if k != "name"},
                )
        dataset = _OPENED[key]
    except FsbenchError as error:
        print(f"fsbench: report: qualitative figure skipped ({error})", file=sys.stderr)
        return None
    seed = result.seed(kept[0]["seed"])
    manifest_file = Path(store.manifests_dir) / f"{seed.manifest_fingerprint[:16]}.json"
    episodes = verified_episodes(manifest_file, seed.manifest_fingerprint)
    if not episodes:
        print(
            f"fsbench: report: qualitative figure skipped ({manifest_file}: missing, or its "
            "episodes are not the ones the cell was scored on; the next `run` writes it again)",
            file=sys.stderr,
        )
        return None
    size = config.input_size
    resize = result.preset().resize
    rows = []
    for item in kept[:max_episodes]:
        spec = episodes[item["episode"]]
        support_id, query_id = spec["support"][0][0], spec["query"][0]
        support, support_label = input_view(dataset, support_id, spec["classes"], size, resize)
        query, query_label = input_view(dataset, query_id, spec["classes"], size, resize)
        prediction = np.asarray(item["prediction"])
        if prediction.shape != query_label.shape:  # scored at the original resolution
            height, width = query_label.shape
            picture = Image.fromarray(prediction.astype(np.uint8))
            prediction = np.asarray(picture.resize((width, height), Image.NEAREST))
        rows.append(
            (
                spec,
                [
                    (support, support_label, "support + mask"),
                    (query, prediction == 1, "query + prediction"),
                    (query, query_label, "query + ground truth"),
                ],
            )
        )
    return rows


def qualitative_strip(result: CellRecord, store, path: Path, max_episodes: int = 2):
    """The same panels as `qualitative_figure` as one PNG composed with numpy (milliseconds,
    not matplotlib's ~0.8 s): a row per episode, support | prediction | ground truth, the mask
    tinted white over a darkened image."""
    rows = qualitative_rows(result, store, max_episodes)
    if not rows:
        return None
    names = class_names(result.config.dataset_name)
    strips = []
    for spec, panels in rows:
        class_id = int(spec["classes"][0])
        width = panels[0][0].shape[1]
        strips.append(
            _caption(
                [f"support: {names.get(class_id, f'class {class_id}')}", "prediction", "truth"],
                width,
            )
        )
        tiles = []
        for image, mask, _ in panels:
            tile = np.asarray(image, dtype=np.float32) * 0.55
            tile[mask] = 0.45 * np.asarray(image, dtype=np.float32)[mask] + 0.55 * 255
            tiles.append(tile.astype(np.uint8))
            tiles.append(np.full((tile.shape[0], 4, 3), 255, np.uint8))
        strips.append(np.concatenate(tiles[:-1], axis=1))
        strips.append(np.full((4, strips[-1].shape[1], 3), 255, np.uint8))
    title = _caption([result.title], strips[1].shape[1], columns=1)
    # PNG level 1: a few ms per strip (the default level costs ~4x more for ~20% fewer bytes)
    Image.fromarray(np.concatenate([title, *strips[:-1]], axis=0)).save(path, compress_level=1)
    return Path(path)


def _caption(texts: list[str], width: int, columns: int = 3) -> np.ndarray:
    """A white band with each text left-aligned over its column (PIL's default bitmap font)."""
    from PIL import ImageDraw

    total = width * columns + 4 * (columns - 1) if columns > 1 else width
    band = Image.new("RGB", (total, 14), "white")
    draw = ImageDraw.Draw(band)
    for index, text in enumerate(texts):
        draw.text((index * (width + 4) + 2, 1), text, fill="black")
    return np.asarray(band)
