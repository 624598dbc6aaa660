"""Generated data in LVIS-92i's real formats: Matcher's pickles (`LVIS/lvis_{train,val}.pkl`)
and the LVIS v1 JSON they come from (`LVIS/lvis_v1_{train,val}.json`), COCO 2017 images under
`LVIS/coco/{train2017,val2017}/<12 digits>.jpg`; polygons, with RLE where an object is occluded.
The pickles are built from the JSON by `classwise_from_json`, so both readings agree here."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.datasets.lvis import Lvis92i, classwise_from_json
from fsbench.datasets.registry import DATASETS
from fsbench.datasets.synthetic import ensure_generated
from fsbench.datasets.synthetic_coco import render_coco_image

# 40 real LVIS v1 category ids spread over 1…1203 (the loader must not assume 1…n).
CATEGORY_IDS = tuple(1 + 30 * k for k in range(40))


def write_lvis(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    """Write LVIS/ with both forms of the annotations; writes pickles unless `json_only`."""
    from pycocotools import mask as mask_utils

    folder = Path(root) / "LVIS"
    documents = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    annotation_id = 1
    for index in range(n_images):
        split = "val" if np.random.default_rng([seed, index, 7]).random() < 0.6 else "train"
        image_id = 1000 + index
        coco_folder = "val2017" if index % 3 == 0 else "train2017"  # LVIS val spans both
        pixels, annotations = render_coco_image(index, image_size, seed)
        (folder / "coco" / coco_folder).mkdir(parents=True, exist_ok=True)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).convert("RGB").save(folder / "coco" / coco_folder / file_name)
        height, width = pixels.shape[:2]
        documents[split]["images"].append({
            "id": image_id, "height": height, "width": width,
            "coco_url": f"http://images.cocodataset.org/{coco_folder}/{file_name}",
        })  # fmt: skip
        for class_index, mask, crowd, polygon in annotations:
            category = (class_index - 1) % len(CATEGORY_IDS)
            if crowd or (category % 7 == 3 and index % 6):
                continue  # LVIS has no crowds; every 7th category is rare (1-shot folds only)
            if polygon is not None:
                segmentation = [[round(float(v), 2) for point in polygon for v in point]]
            else:
                encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": encoded["size"], "counts": encoded["counts"].decode()}
            documents[split]["annotations"].append({
                "id": annotation_id, "image_id": image_id, "area": float(mask.sum()),
                "category_id": CATEGORY_IDS[category],
                "segmentation": segmentation,
            })  # fmt: skip
            annotation_id += 1
    categories = [{"id": c, "name": f"lvis-{c}"} for c in CATEGORY_IDS]
    for split, content in documents.items():
        path = folder / f"lvis_v1_{split}.json"
        path.write_text(json.dumps({"categories": categories, **content}))
        with open(folder / f"lvis_{split}.pkl", "wb") as handle:
            pickle.dump(classwise_from_json(path), handle)
    return folder


@DATASETS.register("synthetic_lvis92i")
def synthetic_lvis92i(
    data_root: str | None = None, n_images: int = 400, image_size: int = 64, seed: int = 0, **kw
) -> Lvis92i:
    """Generated LVIS-92i (Matcher's pickles and the LVIS v1 JSON, 40 categories), cached."""
    cache = Path(data_root) if data_root else None
    return Lvis92i(ensure_generated("lvis", write_lvis, n_images, image_size, seed, cache), **kw)
