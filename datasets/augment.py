"""Training augmentations as named recipes (`train.augment:` in a grid), in a registry a plugin
can extend (`AUGMENTATIONS.register("name")` on an `Augmentation` subclass).

An augmentation has two halves, so training stays deterministic whatever the worker count:
`draw(rng)` gives one image's parameters, drawn up front in the main process from the step
plan's seeded generator; the episode loader (possibly in a DataLoader worker) then applies them,
either to the decoded image and its dense label before they are fitted to the input size
(`raw`), or to the finished tensors (`tensors`).

- `none`: nothing.
- `flip` (= `flip: true`, PANet's): a horizontal flip with probability 0.5.
- `pfenet`: PFENet's training transform (its `train.py`): RandScale [0.9, 1.1], RandRotate
  ±10° with probability 0.5 (image padded with the ImageNet mean, label with void),
  GaussianBlur 5×5 with probability 0.5, horizontal flip with probability 0.5, then a random
  crop to the input size (padded with the mean / void when smaller), redrawn — up to 31 times,
  as its `Crop` — while it keeps less than 85% of the image's foreground, each image on its own.

An augmentation's `version` joins the training settings' identity (`train.augment_version`):
changing what a named augmentation does moves the cell ids of the grids that use it, so finished
results of the old behaviour are never reused as if they were the new one's.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import correlate1d

from fsbench.core import Registry
from fsbench.datasets.resize import normalise

MEAN_PIXELS = (123.675, 116.28, 103.53)  # ImageNet mean × 255: PFENet's padding value
PAD = 254  # a padding pixel in a raw label (void everywhere, never support background)
VOID = 255


class Augmentation:
    """No change (the `none` recipe); subclasses override `draw`, and `raw` (declaring
    `raw_pixels = True`) or `tensors`."""

    raw_pixels = False  # `raw` transforms the decoded image before it is fitted to the input
    version = ""  # bumped when what the augmentation computes changes (joins cell ids)

    def draw(self, rng: np.random.Generator):
        """One image's parameters (plain, picklable values)."""
        return None

    def raw(self, pixels: np.ndarray, label: np.ndarray, params, size: int):
        """(pixels [S, S, 3] uint8, label [S, S] uint8) at the input size S from the decoded image
        [H, W, 3] and its raw label [H, W] (0 background, i the i-th episode class, 255 void;
        PAD where the transform padded)."""
        return pixels, label

    def tensors(self, tensors: tuple, params) -> tuple:
        """The finished tensors of one image (image [3,S,S], then its masks [..., S, S])."""
        return tensors


AUGMENTATIONS = Registry("augmentation", base=Augmentation)


@AUGMENTATIONS.register("none")
class NoAugmentation(Augmentation):
    pass


@AUGMENTATIONS.register("flip")
class Flip(Augmentation):
    """PANet's random horizontal flip (one draw per image, as `flip: true` always drew)."""

    def draw(self, rng):
        return bool(rng.random() < 0.5)

    def tensors(self, tensors, params):
        return tuple(t.flip(-1) for t in tensors) if params else tensors


def _gaussian_blur(pixels: np.ndarray) -> np.ndarray:
    """cv2.GaussianBlur(image, (5, 5), 0): σ = 0.3·((5−1)·0.5 − 1) + 0.8 = 1.1, separable,
    reflect-101 borders."""
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    taps = np.exp(-(np.arange(-2, 3) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    out = pixels.astype(np.float64)
    for axis in (0, 1):
        out = correlate1d(out, taps, axis=axis, mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@AUGMENTATIONS.register("pfenet")
class PfenetAugmentation(Augmentation):
    """PFENet's training transform (scale, rotate, blur, flip, crop), on raw pixels."""

    raw_pixels = True
    version = "2"  # 2: the crop is redrawn while it keeps < 85% of the foreground, as PFENet's

    scale = (0.9, 1.1)
    rotate = (-10.0, 10.0)
    crops = 1 + 31  # the first crop and PFENet's redraws (`while … and crop_cnt <= 30`)

    def draw(self, rng):
        # a fixed number of draws per image, whatever is applied: the plan stays aligned
        u = rng.random(5 + 2 * self.crops)
        return (
            self.scale[0] + (self.scale[1] - self.scale[0]) * u[0],  # scale
            bool(u[1] < 0.5),  # rotate?
            self.rotate[0] + (self.rotate[1] - self.rotate[0]) * u[2],  # angle (degrees)
            bool(u[3] < 0.5),  # blur?
            bool(u[4] < 0.5),  # flip?
            tuple(float(v) for v in u[5:]),  # crop (row, column) offsets, shares of the free
        )

    def raw(self, pixels, label, params, size):
        scale, rotate, angle, blur, flip, offsets = params
        image, target = Image.fromarray(pixels), Image.fromarray(label)
        width, height = image.size
        scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
        image, target = image.resize(scaled, Image.BILINEAR), target.resize(scaled, Image.NEAREST)
        if rotate:
            fill = tuple(round(v) for v in MEAN_PIXELS)
            image = image.rotate(angle, Image.BILINEAR, fillcolor=fill)
            target = target.rotate(angle, Image.NEAREST, fillcolor=PAD)
        pixels, label = np.asarray(image), np.asarray(target)
        if blur:
            pixels = _gaussian_blur(pixels)
        if flip:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        return _random_crop(pixels, label, size, offsets)


@AUGMENTATIONS.register("pspnet")
class PspnetAugmentation(PfenetAugmentation):
    """BAM's base-learner transform (train_base.py): PFENet's with scales 0.5–2.0."""

    scale = (0.5, 2.0)


@AUGMENTATIONS.register("bam_coco")
class BamCocoAugmentation(PfenetAugmentation):
    """BAM's and HDMNet's COCO-20i meta-training transform: PFENet's with scales 0.8–1.25."""

    scale = (0.8, 1.25)


def _foreground(label: np.ndarray) -> int:
    """Pixels of the episode's classes in a raw label (1…N; not background, void or padding)."""
    return int(((label >= 1) & (label < PAD)).sum())


def _random_crop(pixels, label, size, offsets):
    """PFENet's Crop(crop_type='rand'): pad to at least size × size (half before, half after,
    mean / padding), cut a size × size window at the drawn offsets, and redraw (at the next
    pair of offsets, up to 31 times) while the window keeps less than 85% of the foreground."""
    height, width = label.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        border = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        canvas = np.empty((height + pad_h, width + pad_w, 3), np.uint8)
        canvas[:] = np.round(MEAN_PIXELS).astype(np.uint8)
        canvas[border[0][0] : border[0][0] + height, border[1][0] : border[1][0] + width] = pixels
        pixels, label = canvas, np.pad(label, border, constant_values=PAD)
        height, width = label.shape
    whole = _foreground(label)
    for row, col in zip(offsets[::2], offsets[1::2]):
        top = int(row * (height - size + 1))
        left = int(col * (width - size + 1))
        window = (slice(top, top + size), slice(left, left + size))
        if _foreground(label[window]) >= 0.85 * whole:
            break  # the official keeps the last window when every redraw falls short
    return np.ascontiguousarray(pixels[window]), np.ascontiguousarray(label[window])


def augmented_views(dataset, image_id: str, classes, augmentation, param, size: int):
    """(image [3,S,S], masks [N,S,S], void [S,S], padding [S,S]) of one image augmented on its
    decoded pixels and dense label (augmentations with `raw_pixels`)."""
    masks, void = dataset.load_masks(image_id, list(classes))
    label = np.zeros(void.shape, np.uint8)
    label[void] = VOID
    for index, mask in enumerate(masks, start=1):
        label[mask] = index
    pixels, label = augmentation.raw(dataset.load_image(image_id), label, param, size)
    classes_at = torch.from_numpy(label.astype(np.int64))
    masks = torch.stack([classes_at == index for index in range(1, len(classes) + 1)])
    return normalise(pixels), masks, classes_at == VOID, classes_at == PAD


def label_of(masks, void):
    """[S, S] long: 0 background, i for the i-th class of `masks` [N, S, S], 255 where `void`."""
    target = torch.zeros(void.shape, dtype=torch.long)
    target[void] = 255
    for index in range(masks.shape[0]):
        target[masks[index]] = index + 1
    return target
