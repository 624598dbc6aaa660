"""The protocols' input geometry (torch-free, so reports can draw in the network's frame).

Each resize mode is one lineage's test transform, resampling included:
- "square" (PANet): stretch to S×S; PIL bilinear images, PIL nearest labels (torchvision's
  functional resize on PIL images, as PANet's dataloaders/transforms.py).
- "square_floor_nearest" (HSNet): the same images (torchvision Resize on PIL); masks resized
  with torch's `F.interpolate(mode="nearest")`, which samples source pixel ⌊x·in/out⌋ (PIL's
  nearest samples pixel centres instead).
- "keep_ratio_pad" (PFENet's util/transform.py Resize, as its configs' `resized_val` selects):
  the longer side to S, the other `int(side·S/longer)`, both floored to a multiple of 8; images
  resampled as cv2.INTER_LINEAR on float pixels and kept as floats to the network, as PFENet's
  pipeline keeps them (rounding them to uint8 moved a PFENet's logits by up to 2.0), labels as
  cv2.INTER_NEAREST (⌊x·in/out⌋); padded at the bottom/right with raw black (image) and 255
  (label).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fsbench.core import FsbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZES = ("square", "square_floor_nearest", "keep_ratio_pad")


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise FsbenchError(f"resize {resize!r} is not one of {', '.join(RESIZES)}")
    return resize


def content_size(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    """(h, w) of an H×W image's content inside the size×size input; the rest is padding."""
    if resize != "keep_ratio_pad":
        return size, size
    if height >= width:  # PFENet's find_new_hw, float arithmetic included
        new_h, new_w = size, int(width * (size * 1.0 / height))
    else:
        new_h, new_w = int(height * (size * 1.0 / width)), size
    return max(8, new_h // 8 * 8), max(8, new_w // 8 * 8)


def _linear_taps(n_in: int, n_out: int):
    """cv2.INTER_LINEAR's source taps along one axis (half-pixel centres, clamped edges)."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    return low, np.minimum(low + 1, n_in - 1), (source - low)


def _floor_nearest(n_in: int, n_out: int, resize: str) -> np.ndarray:
    """Source index ⌊x·in/out⌋ in each library's arithmetic (they differ at exact integers):
    cv2.INTER_NEAREST multiplies by 1/(out/in) in double, torch's "nearest" by in/out in float32
    (checked against both over a range of sizes)."""
    if resize == "keep_ratio_pad":
        source = np.arange(n_out) * (1.0 / (n_out / n_in))
    else:
        source = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    return np.minimum(np.floor(source).astype(np.int64), n_in - 1)


def _resample(array: np.ndarray, height: int, width: int, resize: str, resample) -> np.ndarray:
    if resample == Image.NEAREST and resize != "square":
        rows = _floor_nearest(array.shape[0], height, resize)
        cols = _floor_nearest(array.shape[1], width, resize)
        return array[rows][:, cols]
    if resize == "keep_ratio_pad":
        pixels = array.astype(np.float32)
        low, high, frac = _linear_taps(array.shape[0], height)
        frac = frac.reshape(-1, *([1] * (array.ndim - 1)))
        pixels = pixels[low] * (1 - frac) + pixels[high] * frac
        low, high, frac = _linear_taps(array.shape[1], width)
        frac = frac.reshape(1, -1, *([1] * (array.ndim - 2)))
        pixels = pixels[:, low] * (1 - frac) + pixels[:, high] * frac
        return pixels.astype(np.float32)  # never rounded: the network sees float pixels
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def fit(array: np.ndarray, size: int, resize: str, resample, fill) -> np.ndarray:
    """`array` (an image with Image.BILINEAR, a label or mask with Image.NEAREST) in the
    size×size input of `resize`; padding (keep_ratio_pad) is `fill`."""
    height, width = content_size(*array.shape[:2], size, resize)
    resized = _resample(array, height, width, resize, resample)
    if (height, width) == (size, size):
        return resized
    out = np.full((size, size, *resized.shape[2:]), fill, resized.dtype)
    out[:height, :width] = resized
    return out


def normalise(image: np.ndarray):
    """HxWx3 pixels in 0…255 (uint8, or float from keep_ratio_pad) → 3xHxW float tensor,
    ImageNet mean/std."""
    import torch  # here: the report reads this module's geometry without torch

    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std
