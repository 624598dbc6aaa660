"""The generated datasets: the real PASCAL and COCO readers over data that datasets/synthetic.py
writes once, in the real layouts, into the cache folder (or `data_root`)."""

from __future__ import annotations

from pathlib import Path

from fsbench.datasets.coco import Coco20i
from fsbench.datasets.pascal import Pascal5i
from fsbench.datasets.registry import DATASETS
from fsbench.datasets.synthetic import ensure_synthetic_voc
from fsbench.datasets.synthetic_coco import ensure_synthetic_coco


@DATASETS.register("synthetic_pascal5i")
def synthetic_pascal5i(
    data_root: str | None = None,
    n_images: int = 600,
    image_size: int = 128,
    seed: int = 0,
    **kwargs,
) -> Pascal5i:
    """Generated PASCAL-format data (datasets/synthetic.py), written once into the cache folder."""
    cache = Path(data_root) if data_root else None
    return Pascal5i(ensure_synthetic_voc(n_images, image_size, seed, cache_dir=cache), **kwargs)


@DATASETS.register("synthetic_coco20i")
def synthetic_coco20i(
    data_root: str | None = None,
    n_images: int = 1200,
    image_size: int = 128,
    seed: int = 0,
    **kwargs,
) -> Coco20i:
    """Generated COCO-format data (80 classes; polygons, RLE, crowds), generated once, cached."""
    cache = Path(data_root) if data_root else None
    return Coco20i(ensure_synthetic_coco(n_images, image_size, seed, cache_dir=cache), **kwargs)
