"""Weak support annotations derived deterministically from dense masks (PANet's scribble and
bounding-box rows): what `support_fg` / `support_bg` become under `annotation: scribble | bbox`."""

from __future__ import annotations

from collections import deque

import numpy as np

NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _farthest(start, pixels: set):
    """BFS over 8-connected skeleton pixels: the farthest pixel from `start` and the parents."""
    parents = {start: None}
    queue, last = deque([start]), start
    while queue:
        last = queue.popleft()
        for dy, dx in NEIGHBOURS:
            nxt = (last[0] + dy, last[1] + dx)
            if nxt in pixels and nxt not in parents:
                parents[nxt] = last
                queue.append(nxt)
    return last, parents


def scribble(
    mask: np.ndarray,
    rng: np.random.Generator,
    kernel_size: float = 0.15,
    max_radius: float = 16.0,
    min_nodes: int = 4,
) -> np.ndarray:
    """A scribble inside `mask`, as the DAVIS scribble robot that PANet used: open the mask with a
    disk of radius 0.075·√area (≤ 16 px, shrunk until something survives), take the medial axis,
    and draw the longest path of each skeleton component with at least `min_nodes` pixels."""
    from scipy import ndimage
    from skimage.morphology import disk, medial_axis

    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    radius = min(kernel_size * np.sqrt(mask.sum()) * 0.5, max_radius)
    opened = mask
    while radius > 1.0:
        candidate = ndimage.binary_opening(mask, structure=disk(int(radius)))
        if candidate.any():
            opened = candidate
            break
        radius *= 0.9
    # medial_axis breaks ties randomly: seed it, or equal inputs give different scribbles.
    skeleton = medial_axis(np.pad(opened, 1), rng=int(rng.integers(2**31)))[1:-1, 1:-1]
    components, count = ndimage.label(skeleton, structure=np.ones((3, 3)))
    for index in range(1, count + 1):
        points = list(zip(*np.nonzero(components == index)))
        if len(points) < min_nodes:
            continue
        pixels = set(points)
        start = points[int(rng.integers(len(points)))]  # seeded: which end the path starts from
        end, _ = _farthest(start, pixels)
        other, parents = _farthest(end, pixels)
        node = other
        while node is not None:
            out[node] = True
            node = parents[node]
    if not out.any():  # a tiny object: one pixel on its medial axis, so the support is not empty
        distance = ndimage.distance_transform_edt(mask)
        out[np.unravel_index(np.argmax(distance), mask.shape)] = True
    return out


def box_masks(instances: list[np.ndarray], shape) -> tuple[np.ndarray, np.ndarray]:
    """PANet's boxes: foreground = the box of the largest instance; background = everything
    outside the boxes of all the class's instances."""
    fg, bg = np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)
    instances = [m for m in instances if m.any()]
    if not instances:
        return fg, bg
    for index, instance in enumerate(instances):
        ys, xs = np.nonzero(instance)
        bg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = False
        if index == int(np.argmax([m.sum() for m in instances])):
            fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return fg, bg
