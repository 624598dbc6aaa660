import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fsbench.benchmarks.evaluation.evaluate import evaluate
from fsbench.datasets.coco import Coco20i, fold_classes
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.pascal import DatasetError
from fsbench.datasets.protocols import get_protocol
from fsbench.datasets.synthetic_coco import COCO_CATEGORY_IDS, write_coco
from fsbench.datasets.weak import box_masks, scribble
from fsbench.methods import METHODS


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, 600, 64, seed=0)
    return root


def hand_made_coco(root, crowd_mode="keep"):
    """One 10x20 grayscale image: person (id 1) polygon on columns 0-11, toothbrush (id 90)
    as RLE on columns 8-19 (overlapping 8-11), and a crowd of cars (id 3) on rows 8-9."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    Image.fromarray(np.full((10, 20), 128, np.uint8), mode="L").save(
        root / "train2014" / "COCO_train2014_000000000007.jpg"
    )
    from pycocotools import mask as mask_utils

    brush = np.zeros((10, 20), np.uint8)
    brush[:, 8:20] = 1
    rle = mask_utils.encode(np.asfortranarray(brush))
    crowd = np.zeros((10, 20), bool)
    crowd[8:10, :] = True
    flat = crowd.flatten(order="F").astype(int)
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel == value:
            count += 1
        else:
            runs.append(count)
            value, count = pixel, 1
    runs.append(count)
    document = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 10, "width": 20}
        ],
        "categories": [{"id": i, "name": str(i)} for i in COCO_CATEGORY_IDS],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "area": 96.0,
                "segmentation": [[0, 0, 12, 0, 12, 8, 0, 8]],
                "bbox": [0, 0, 12, 8],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 90,
                "iscrowd": 0,
                "area": 120.0,
                "segmentation": {"size": [10, 20], "counts": rle["counts"].decode()},
                "bbox": [8, 0, 12, 10],
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 1,
                "area": 40.0,
                "segmentation": {"size": [10, 20], "counts": runs},
                "bbox": [0, 8, 20, 2],
            },
        ],
    }
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(document))
    return Coco20i(root, crowd=crowd_mode, cache_dir=root / "index")


def test_hand_made_coco_overlap_crowd_grayscale(tmp_path):
    dataset = hand_made_coco(tmp_path)
    image = dataset.load_image("7")
    assert image.shape == (10, 20, 3)  # grayscale file, RGB array, non-square
    masks, void = dataset.load_masks("7", [1, 80, 3])  # category 90 is class 80
    assert masks[0][:8, :12].all() and masks[1][:, 8:].all()
    assert (masks[0] & masks[1]).sum() == 8 * 4  # per-class masks keep the overlap (PANet)
    assert masks[2][8:].all() and not void.any()  # crowd 'keep': part of the class
    assert dataset.class_images("train", 80) == ["7"] and dataset.class_images("train", 3) == ["7"]


@pytest.mark.parametrize("mode", ["ignore", "skip"])
def test_crowd_ignore_and_skip(tmp_path, mode):
    dataset = hand_made_coco(tmp_path, mode)
    masks, void = dataset.load_masks("7", [3])
    assert not masks[0].any()
    if mode == "ignore":
        assert void[8:].all() and void.sum() == 40  # crowd pixels are void (255)
    else:
        assert not void.any()  # crowd annotations dropped: plain background
    assert dataset.class_images("train", 3) == []  # crowds are not examples of the class


def test_fold_conventions_match_published_lists():
    # PANet util/utils.py: fold i = 20i+1 … 20i+20; PFENet/HSNet: range(i+1, 81, 4).
    assert fold_classes(1, "consecutive") == list(range(21, 41))
    for fold, start_stop in enumerate([(1, 78), (2, 79), (3, 80), (4, 81)]):
        assert fold_classes(fold, "interleaved") == list(range(start_stop[0], start_stop[1], 4))
    for style in ("consecutive", "interleaved"):
        classes = sorted(c for f in range(4) for c in fold_classes(f, style))
        assert classes == list(range(1, 81))


def test_generated_coco_loader(coco_root, tmp_path):
    dataset = Coco20i(coco_root, cache_dir=tmp_path)
    raw = json.loads((coco_root / "annotations" / "instances_train2014.json").read_text())
    kinds = {
        ("crowd" if a["iscrowd"] else "rle" if isinstance(a["segmentation"], dict) else "polygon")
        for a in raw["annotations"]
    }
    assert kinds == {"crowd", "rle", "polygon"}
    shapes = {(i["height"], i["width"]) for i in raw["images"]}
    assert any(h != w for h, w in shapes)
    for class_id in (1, 40, 80):
        images = dataset.class_images("train", class_id)
        assert images and all(dataset.load_masks(i, [class_id])[0][0].any() for i in images[:5])
    # indexes are built once and cached on disk (the real train2014 JSON is ~450 MB)
    assert list(tmp_path.glob("coco20i-train2014-*.json"))


def test_first_images_read_from_threads_build_the_index_once(coco_root, tmp_path):
    # The evaluator decodes images in threads; on a fresh dataset object all of them asked for
    # the class index at once and raced on one temp file name (FileNotFoundError).
    from concurrent.futures import ThreadPoolExecutor

    reference = Coco20i(coco_root, cache_dir=tmp_path / "reference")
    ids = reference.list_ids("val")[:16]
    fresh = Coco20i(coco_root, cache_dir=tmp_path / "fresh")
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(fresh.load_image, ids))
    assert all(np.array_equal(a, reference.load_image(i)) for a, i in zip(images, ids))
    written = list((tmp_path / "fresh").iterdir())
    assert written and all(p.suffix == ".json" and json.loads(p.read_text()) for p in written)


def test_original_resolution_scoring_on_non_square_images(coco_root, tmp_path):
    dataset = Coco20i(coco_root, protocol="pfenet", cache_dir=tmp_path)
    protocol = dataclasses.replace(get_protocol("pfenet"), min_object_pixels=1)
    manifest = EpisodeManifest.build(dataset, protocol, 0, 1, 1, 3, 321)
    counts, _, _ = evaluate(
        METHODS.get("test_all_foreground")(), EpisodeLoader(dataset, 32), manifest, protocol
    )
    query = manifest.episodes[0].query[0]
    masks, void = dataset.load_masks(query, list(manifest.episodes[0].classes))
    assert masks.shape[1] != masks.shape[2]
    assert counts.per_class[0].sum() == (~void).sum()  # every original-resolution pixel scored


def test_scribbles_inside_their_region_and_seeded():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 15:70] = True
    fg = scribble(mask, np.random.default_rng(0))
    bg = scribble(~mask, np.random.default_rng(0))
    assert fg.any() and bg.any()
    assert not (fg & ~mask).any() and not (bg & mask).any()
    assert fg.sum() < 0.2 * mask.sum()  # a stroke, not the region
    assert np.array_equal(fg, scribble(mask, np.random.default_rng(0)))


def test_boxes_follow_panet_get_bbox():
    small = np.zeros((40, 40), bool)
    small[2:6, 2:8] = True
    large = np.zeros((40, 40), bool)
    large[20:35, 10:30] = True
    fg, bg = box_masks([small, large], (40, 40))
    assert fg[20:35, 10:30].all() and fg.sum() == 15 * 20  # the largest instance's box
    assert not bg[2:6, 2:8].any() and not bg[20:35, 10:30].any()  # outside every instance box
    assert bg.sum() == 1600 - 24 - 300


@pytest.mark.parametrize("annotation", ["scribble", "bbox"])
def test_weak_support_episodes(dataset, annotation):
    manifest = EpisodeManifest.build(dataset, get_protocol("panet"), 0, 1, 1, 4, 2)
    dense = EpisodeLoader(dataset, 48)
    weak = dense.annotated(annotation, weak_seed=1)
    for spec in manifest.episodes:
        d, w = dense.load(spec), weak.load(spec)
        assert torch.equal(d.query_labels, w.query_labels)  # only the supports change
        assert w.support_fg.sum() > 0
        if annotation == "scribble":
            assert (w.support_fg <= d.support_fg).all() and (w.support_bg <= d.support_bg).all()
        else:
            ys, xs = torch.nonzero(d.support_fg[0, 0], as_tuple=True)
            inside = torch.zeros_like(d.support_fg[0, 0])
            inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
            assert (w.support_fg[0, 0] <= inside).all()  # the box lies in the class's extent
            assert (w.support_bg <= d.support_bg).all()


def test_bad_coco_json_and_missing_image(tmp_path, coco_root):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2014.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a valid COCO instances file"):
        Coco20i(tmp_path, cache_dir=tmp_path / "idx").class_index("train")
    dataset = Coco20i(coco_root, cache_dir=tmp_path / "idx2")
    image_id = dataset.list_ids("train")[0]
    path = coco_root / "train2014" / dataset.class_index("train")["images"][image_id]
    path.rename(path.with_suffix(".moved"))
    try:
        with pytest.raises(DatasetError, match="image file is missing"):
            dataset.load_image(image_id)
    finally:
        path.with_suffix(".moved").rename(path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "manifest",
            "--dataset",
            "coco20i",
            "--data-root",
            str(tmp_path),
            "--fold",
            "0",
            "--output",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "not a valid COCO instances file" in done.stderr
    assert "Traceback" not in done.stderr
