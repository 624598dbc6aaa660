"""A cell's kept episodes as image panels (support + mask, query + prediction, query + ground
truth) in the network's input frame: the data of the report's qualitative figure and the PNG each
MLflow cell run carries (composed with numpy: milliseconds, not matplotlib's ~0.8 s). Imports
neither torch nor matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.benchmarks.store.records import CellRecord
from fsbench.core import FsbenchError
from fsbench.datasets.manifests import EpisodeManifest
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
    try:
        manifest = EpisodeManifest.load_scored(
            Path(store.manifests_dir) / f"{seed.manifest_fingerprint[:16]}.json",
            seed.manifest_fingerprint,
        ).to_json()
    except FsbenchError as error:
        print(f"fsbench: report: qualitative figure skipped ({error})", file=sys.stderr)
        return None
    size = config.input_size
    resize = result.preset().resize
    rows = []
    for item in kept[:max_episodes]:
        spec = manifest["episodes"][item["episode"]]
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
    Image.fromarray(np.concatenate([title, *strips[:-1]], axis=0)).save(path)
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
