"""The protocols' input geometry (torch-free, so reports can draw in the network's frame)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fsbench.datasets.registry import FsbenchError

RESIZES = ("square", "keep_ratio_pad")


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise FsbenchError(f"resize {resize!r} is not {' or '.join(RESIZES)}")
    return resize


def content_size(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    """(h, w) of an H×W image's content inside the size×size input; the rest is padding."""
    if resize == "square":
        return size, size
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit(array: np.ndarray, size: int, resize: str, resample, fill) -> np.ndarray:
    """Stretch to size×size ("square", PANet/HSNet), or fit the longer side and pad with `fill`
    ("keep_ratio_pad", PFENet's test_Resize)."""
    height, width = content_size(*array.shape[:2], size, resize)
    resized = np.asarray(Image.fromarray(array).resize((width, height), resample))
    if (height, width) == (size, size):
        return resized
    out = np.full((size, size, *resized.shape[2:]), fill, resized.dtype)
    out[:height, :width] = resized
    return out
