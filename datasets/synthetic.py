"""Deterministic synthetic few-shot segmentation data, written in the real VOC2012 + SBD-aug layout.

Each of the 20 classes is a (shape, texture) pair in one of six colours. Shapes and textures are
spread so that every fold's five classes have five different shapes, and every shape and texture
also occurs among the other fifteen (training) classes: features transfer to unseen folds, yet a
class is only identified by shape and texture together. Colours repeat across classes and are
reused by unlabelled clutter, so colour alone does not solve an episode.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fsbench.core import FsbenchError, default_cache_dir

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring")
TEXTURES = ("solid", "stripes", "checker", "dots")
COLOURS = (
    (220, 50, 47),
    (38, 139, 210),
    (133, 153, 0),
    (211, 130, 20),
    (108, 113, 196),
    (42, 161, 152),
)
GENERATOR_VERSION = 3
NUM_VOC_CLASSES = 20


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map (bit-interleaved), flattened for PIL's putpalette."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= ((code >> 0) & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
        palette += [red, green, blue]
    return palette


def class_style(class_id: int) -> tuple[str, str, tuple[int, int, int]]:
    """(shape, texture, colour) of a 1-based class id in a 20-class (5 per fold) layout."""
    fold, position = divmod((class_id - 1) % NUM_VOC_CLASSES, 5)
    return (
        SHAPES[position],
        TEXTURES[(fold + position) % len(TEXTURES)],
        COLOURS[(2 * fold + position) % len(COLOURS)],
    )


def shape_polygons(shape, centre, radius, aspect, angle):
    """Outer polygon(s) and holes of a shape, as lists of (x, y) points."""

    def transform(points):
        cos, sin = np.cos(angle), np.sin(angle)
        out = []
        for x, y in points:
            x, y = x * radius * aspect, y * radius
            out.append((centre[0] + cos * x - sin * y, centre[1] + sin * x + cos * y))
        return out

    circle = [(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    if shape == "ellipse":
        return [transform(circle)], []
    if shape == "ring":
        return [transform(circle)], [transform([(0.5 * x, 0.5 * y) for x, y in circle])]
    if shape == "rectangle":
        return [transform([(-0.9, -0.7), (0.9, -0.7), (0.9, 0.7), (-0.9, 0.7)])], []
    if shape == "triangle":
        return [transform([(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)])], []
    if shape == "cross":
        arm = 0.33
        points = [
            (-arm, -1),
            (arm, -1),
            (arm, -arm),
            (1, -arm),
            (1, arm),
            (arm, arm),
            (arm, 1),
            (-arm, 1),
            (-arm, arm),
            (-1, arm),
            (-1, -arm),
            (-arm, -arm),
        ]
        return [transform(points)], []
    raise ValueError(shape)


def rasterize(size_hw, outers, holes=()):
    canvas = Image.new("L", (size_hw[1], size_hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in outers:
        draw.polygon(polygon, fill=1)
    for polygon in holes:
        draw.polygon(polygon, fill=0)
    return np.asarray(canvas, dtype=bool)


def texture_fill(size_hw, texture, colour, rng):
    """An HxWx3 float image of the texture in `colour` (with a darker second tone)."""
    height, width = size_hw
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.integers(0, 16, size=2)
    if texture == "solid":
        pattern = np.zeros((height, width), dtype=bool)
    elif texture == "stripes":
        pattern = ((ys + phase[0]) // 3) % 2 == 0
    elif texture == "checker":
        pattern = (((ys + phase[0]) // 4) + ((xs + phase[1]) // 4)) % 2 == 0
    elif texture == "dots":
        pattern = (((ys + phase[0]) % 6) < 2) & (((xs + phase[1]) % 6) < 2)
    else:
        raise ValueError(texture)
    base = np.array(colour, dtype=np.float32)
    dark = base * 0.35
    return np.where(pattern[..., None], dark, base)


def _dilate(mask):
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def render_scene(rng, size_hw, scale, classes, style):
    """Background gradient, unlabelled clutter, then the objects in drawing order.

    Returns the float image and, per object, (class id, full mask, outer polygons, holes)."""
    height, width = size_hw
    tones = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    image = tones[0] * (1 - ramp) + tones[1] * ramp + np.zeros((height, 1, 3), np.float32)
    # Unlabelled clutter: irregular blobs in the class colours and textures.
    for _ in range(rng.integers(2, 5)):
        centre = rng.uniform(0, 1, 2) * (width, height)
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 8)))
        radii = rng.uniform(0.04, 0.12, len(angles)) * scale
        polygon = [
            (centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for a, r in zip(angles, radii)
        ]
        blob = rasterize(size_hw, [polygon])
        colour = COLOURS[rng.integers(len(COLOURS))]
        fill = texture_fill(size_hw, TEXTURES[rng.integers(len(TEXTURES))], colour, rng)
        image[blob] = fill[blob]
    objects = []
    for class_id in classes:
        shape, texture, colour = style(class_id)
        radius = rng.uniform(0.12, 0.24) * scale
        centre = rng.uniform(0.2, 0.8, 2) * (width, height)
        outers, holes = shape_polygons(
            shape, centre, radius, rng.uniform(0.8, 1.25), rng.uniform(-0.4, 0.4)
        )
        mask = rasterize(size_hw, outers, holes)
        if not mask.any():
            continue
        fill = texture_fill(size_hw, texture, colour, rng) * rng.uniform(0.85, 1.15)
        image[mask] = fill[mask]
        objects.append((class_id, mask, outers, holes))
    return image, objects


def finish_image(image, rng):
    image = image + rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_image(index: int, image_size: int, seed: int, num_classes: int = NUM_VOC_CLASSES):
    """One VOC image, its class label map and its instance map (0 background, 255 outline)."""
    rng = np.random.default_rng([seed, index])
    size_hw = ((image_size * 3) // 4, image_size)
    # The first class cycles through all classes so each has enough images.
    n_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    classes = [1 + index % num_classes] + [
        int(c) for c in rng.integers(1, num_classes + 1, n_objects - 1)
    ]
    image, objects = render_scene(rng, size_hw, image_size, classes, class_style)
    label = np.zeros(size_hw, dtype=np.uint8)
    instances = np.zeros(size_hw, dtype=np.uint8)
    for instance, (class_id, mask, _, _) in enumerate(objects, start=1):
        label[mask] = class_id
        instances[mask] = instance
        # VOC marks object outlines with 255 ("void"): a band on both sides of the edge.
        edge = _dilate(mask) & _dilate(~mask)
        label[edge] = 255
        instances[edge] = 255
    return finish_image(image, rng), label, instances


def write_voc(root: Path, n_images: int, image_size: int, seed: int) -> Path:
    """Write `root/VOCdevkit/VOC2012`: JPEGImages, SegmentationClassAug, SegmentationObjectAug
    (instance ids, as SBD-aug ships them) and the ImageSets/Segmentation lists."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationObjectAug").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    ids = [f"2008_{index:06d}" for index in range(n_images)]
    for index, image_id in enumerate(ids):
        image, label, instances = render_image(index, image_size, seed)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=92)
        for folder, values in (
            ("SegmentationClassAug", label),
            ("SegmentationObjectAug", instances),
        ):
            png = Image.fromarray(values, mode="P")
            png.putpalette(palette)
            png.save(voc / folder / f"{image_id}.png")
    # As in SBD-aug: val is disjoint from trainaug; train (VOC's own) is a subset of trainaug.
    # Split by blocks of NUM_VOC_CLASSES images: each block cycles once through every class, so
    # every class keeps the same share of images in every list.
    block = [(n // NUM_VOC_CLASSES) % 5 for n in range(n_images)]
    val = [i for i, b in zip(ids, block) if b == 4]
    trainaug = [i for i, b in zip(ids, block) if b != 4]
    train = [i for i, b in zip(ids, block) if b in (0, 1)]
    for name, split in (("train", train), ("val", val), ("trainaug", trainaug)):
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(split) + "\n")
    return voc


# False inside `existing_only()`: readers of old results (reports) never write datasets.
_GENERATE = contextvars.ContextVar("fsbench_generate", default=True)


@contextlib.contextmanager
def existing_only():
    """Open generated datasets only if they exist already (FsbenchError otherwise)."""
    token = _GENERATE.set(False)
    try:
        yield
    finally:
        _GENERATE.reset(token)


def ensure_generated(
    kind: str, writer, n_images: int, image_size: int, seed: int, cache_dir: Path | None
) -> Path:
    """Generate a dataset once into the cache (atomic rename: racing workers are safe)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    params = {
        "version": GENERATOR_VERSION,
        "kind": kind,
        "n_images": n_images,
        "image_size": image_size,
        "seed": seed,
    }
    root = cache_dir / f"synthetic-{kind}-v{GENERATOR_VERSION}-n{n_images}-s{image_size}-seed{seed}"
    marker = root / "fsbench_synthetic.json"
    if marker.exists():
        return root
    if not _GENERATE.get():
        raise FsbenchError(f"{root}: generated dataset not there (and not generated here)")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise FsbenchError(
            f"{cache_dir}: is a file; a generated dataset's data_root must be a folder (or "
            "unset, for the fsbench cache)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        writer(staging, n_images, image_size, seed)
        (staging / "fsbench_synthetic.json").write_text(json.dumps(params, indent=1))
        try:
            staging.rename(root)
        except OSError:
            if not marker.exists():  # someone else won the race only if the marker is there
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_synthetic_voc(
    n_images: int = 600, image_size: int = 128, seed: int = 0, cache_dir: Path | None = None
) -> Path:
    """The root of a generated VOC dataset (contains VOCdevkit/), generated once and cached."""
    return ensure_generated("voc", write_voc, n_images, image_size, seed, cache_dir)
