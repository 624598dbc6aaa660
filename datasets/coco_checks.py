"""Checks of a COCO instances file before pycocotools indexes it and of each segmentation
before it decodes one: every malformed entry is refused naming the file and the entry, instead
of a KeyError, a misleading count or (for a malformed RLE) a corrupted C heap later."""

from __future__ import annotations

from pathlib import Path

from fsbench.datasets.pascal import DatasetError

IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area")


def check_instances(data, path: Path) -> None:
    """Refuse, naming the file and the entry, what pycocotools would fail on later (or count
    wrong): missing sections or keys, an image id listed twice, annotations of unknown images."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (the top level is not an object)")
    for section in ("images", "annotations", "categories"):
        if not isinstance(data.get(section), list):
            raise DatasetError(
                f"{path}: has no `{section}` list; a COCO instances file has images, "
                "annotations and categories (use instances_<split><year>.json, not captions "
                "or image-info files)"
            )
    files: dict = {}
    for image in data["images"]:
        missing = [k for k in IMAGE_KEYS if not isinstance(image, dict) or k not in image]
        if missing:
            raise DatasetError(
                f"{path}: image entry {_entry(image)} lacks {', '.join(missing)}; "
                "each image needs id, file_name, height and width"
            )
        if image["id"] in files:
            raise DatasetError(
                f"{path}: image id {image['id']} is listed twice ({files[image['id']]} and "
                f"{image['file_name']}); each image id must be unique"
            )
        files[image["id"]] = image["file_name"]
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category:
            raise DatasetError(f"{path}: category entry {_entry(category)} has no id")
    for ann in data["annotations"]:
        missing = [k for k in ANNOTATION_KEYS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise DatasetError(
                f"{path}: annotation {_entry(ann)} lacks {', '.join(missing)}; each annotation "
                "needs id, image_id, category_id, segmentation and area"
            )
        if ann["image_id"] not in files:
            raise DatasetError(
                f"{path}: annotation {ann['id']} refers to image {ann['image_id']!r}, which is "
                "not in `images`; fix or remove that annotation"
            )


def segmentation_problem(segmentation, height: int, width: int) -> str | None:
    """What is wrong with a segmentation before pycocotools decodes it (a malformed RLE can
    corrupt its C heap): polygons of ≥ 3 points, RLE of the image's size whose counts cover it."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(isinstance(v, (int, float)) for v in polygon)
            ):
                return "a polygon needs ≥ 3 (x, y) points as a flat list of numbers"
        return None if segmentation else "an empty polygon list"
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or ()) != [height, width]:
            return f"RLE size {size} is not the image's [{height}, {width}]"
        if isinstance(counts, str):
            return None
        if (
            not isinstance(counts, list)
            or not all(isinstance(v, int) and v >= 0 for v in counts)
            or sum(counts) != height * width
        ):
            return f"RLE counts do not cover the {height}×{width} image"
        return None
    return f"a segmentation is a polygon list or an RLE dict, not {type(segmentation).__name__}"


def _entry(entry) -> str:
    return repr(entry.get("id")) if isinstance(entry, dict) and "id" in entry else repr(entry)[:60]
