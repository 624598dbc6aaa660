"""Generated data in the real COCO format (instances_*2014.json with polygons, RLE crowds and
the real category ids; train2014/, val2014/ images of varied sizes, some grayscale), drawn with
the scene renderer of synthetic.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.datasets.coco import COCO_CLASSES
from fsbench.datasets.synthetic import (
    COLOURS,
    SHAPES,
    TEXTURES,
    ensure_generated,
    finish_image,
    rasterize,
    render_scene,
    shape_polygons,
    texture_fill,
)

# The real COCO category ids (1…90 with ten gaps), so loaders must map them to 1…80 themselves.
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)


def coco_class_style(class_index: int):
    """(shape, texture, colour) of a contiguous class index 1…80."""
    k = class_index - 1
    return SHAPES[k % 5], TEXTURES[(k // 5) % 4], COLOURS[(k // 20 + k // 5) % len(COLOURS)]


def render_coco_image(index: int, image_size: int, seed: int):
    """A non-square (sometimes grayscale) image and its annotations: (class index 1…80, visible
    mask, is_crowd, polygon or None) with occlusion, repeated classes and crowd regions."""
    rng = np.random.default_rng([seed, index, 80])
    size_hw = (int(image_size * rng.uniform(0.6, 0.95)), int(image_size * rng.uniform(0.8, 1.25)))
    n_objects = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    classes = [1 + index % 80] + [int(c) for c in rng.integers(1, 81, n_objects - 1)]
    if rng.random() < 0.3:
        classes.append(classes[0])  # several instances of one class
    image, objects = render_scene(rng, size_hw, image_size, classes, coco_class_style)
    annotations = []
    for position, (class_index, mask, outers, holes) in enumerate(objects):
        hidden = np.zeros_like(mask)
        for _, later, _, _ in objects[position + 1 :]:
            hidden |= later
        visible = mask & ~hidden
        if visible.sum() < 4:
            continue
        polygon = outers[0] if not holes and not (mask & hidden).any() else None
        annotations.append((class_index, visible, False, polygon))
    if rng.random() < 0.2:  # a crowd: a cluster of small blobs of one class, one RLE annotation
        class_index = int(rng.integers(1, 81))
        shape, texture, colour = coco_class_style(class_index)
        crowd = np.zeros(size_hw, dtype=bool)
        centre = rng.uniform(0.25, 0.75, 2) * (size_hw[1], size_hw[0])
        for _ in range(rng.integers(3, 6)):
            offset = centre + rng.normal(0, 0.08 * image_size, 2)
            outers, holes = shape_polygons(shape, offset, 0.05 * image_size, 1.0, 0.0)
            crowd |= rasterize(size_hw, outers, holes)
        taken = np.zeros_like(crowd)
        for _, visible, _, _ in annotations:
            taken |= visible
        crowd &= ~taken
        if crowd.sum() >= 4:
            fill = texture_fill(size_hw, texture, colour, rng)
            image[crowd] = fill[crowd]
            annotations.append((class_index, crowd, True, None))
    pixels = finish_image(image, rng)
    if rng.random() < 0.2:
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))  # COCO has grayscale images
    return pixels, annotations


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def write_coco(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    """Write annotations/instances_{train,val}2014.json and train2014/, val2014/ images."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": cid, "name": name, "supercategory": "synthetic"}
        for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES)
    ]
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    annotation_id = 1
    for index in range(n_images):
        # A seeded 80/20 split independent of the class cycle (index mod 80).
        split = "val" if np.random.default_rng([seed, index, 5]).random() < 0.2 else "train"
        image_id = index + 1
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        (root / f"{split}2014").mkdir(exist_ok=True)
        pixels, annotations = render_coco_image(index, image_size, seed)
        Image.fromarray(pixels).save(root / f"{split}2014" / file_name, quality=92)
        height, width = pixels.shape[:2]
        splits[split]["images"].append(
            {"id": image_id, "file_name": file_name, "height": height, "width": width}
        )
        for class_index, mask, crowd, polygon in annotations:
            if crowd:
                segmentation = _uncompressed_rle(mask)
            elif polygon is not None:
                segmentation = [[round(float(v), 2) for point in polygon for v in point]]
            else:
                encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": encoded["size"], "counts": encoded["counts"].decode()}
            ys, xs = np.nonzero(mask)
            splits[split]["annotations"].append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[class_index - 1],
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "iscrowd": int(crowd),
                    "bbox": [
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() - xs.min() + 1),
                        float(ys.max() - ys.min() + 1),
                    ],
                }
            )
            annotation_id += 1
    for split, content in splits.items():
        (root / f"{split}2014").mkdir(exist_ok=True)
        document = {
            "info": {"description": "fsbench synthetic COCO-format data"},
            "licenses": [],
            "categories": categories,
            **content,
        }
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(document))
    return root


def ensure_synthetic_coco(
    n_images: int = 1200, image_size: int = 128, seed: int = 0, cache_dir: Path | None = None
) -> Path:
    """The root of a generated COCO dataset (annotations/, train2014/, val2014/), cached."""
    return ensure_generated("coco", write_coco, n_images, image_size, seed, cache_dir)
