"""The class mix of fsbench's training samplers against each lineage's own loader.

    python -m fsbench.benchmarks.tools.sampler_mix [--data-root DIR] [--fold 0] [--steps 20000]

For each lineage protocol (pfenet, hsnet) on a PASCAL-5i layout (a generated one without
`--data-root`): the share of training episodes of each training class under `sampler: fsbench`
(a class drawn uniformly) and `sampler: official` (the lineage's walk), beside the share the
official loader's rule gives over one epoch of its list — PFENet's `SemData` (every image with
≥ 2·32·32 px of a training class once, its class drawn uniformly among the training classes it
holds: Σ over images of 1/|classes|), HSNet's `DatasetPASCAL` (every listed (image, class) pair
once: the pairs per class).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.plan import stage_plan
from fsbench.datasets.protocols import resolve
from fsbench.datasets.registry import open_dataset


def official_loader_mix(dataset, protocol, split, train_classes) -> dict[int, float]:
    """Each class's expected share of an epoch of the lineage's own training loader."""
    big = protocol.min_object_pixels
    counts: Counter = Counter()
    if protocol.official_sampler == "pfenet":
        members = {c: set(dataset.class_images(split, c, 1)) for c in train_classes}
        walk = set().union(*(set(dataset.class_images(split, c, big)) for c in train_classes))
        for image in walk:
            held = [c for c in train_classes if image in members[c]]
            for c in held:
                counts[c] += 1 / len(held)
    else:
        for c in train_classes:
            counts[c] = len(dataset.class_images(split, c, 1))
    total = sum(counts.values()) or 1
    return {c: counts[c] / total for c in train_classes}


def sampler_mix(dataset, protocol, fold: int, sampler: str, steps: int) -> dict[int, float]:
    """Each training class's share of `steps` 1-way 1-shot training episodes of `sampler`."""
    split = dataset.train_split(protocol)
    train_classes = dataset.train_classes(fold)
    cfg = TrainConfig(steps=steps, sampler=sampler, flip=False, lr_milestones=(steps + 1,))
    plan = stage_plan(dataset, protocol, split, fold, train_classes, 1, 1, cfg)
    counts = Counter(spec.classes[0] for step in plan for spec, _ in step)
    return {c: counts[c] / steps for c in train_classes}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="a VOC2012 + SBD-aug folder (default: generated)")
    parser.add_argument("--fold", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.data_root is None:
        folder = tempfile.mkdtemp(prefix="fsbench-mix-")
        spec = {
            "name": "synthetic_pascal5i",
            "n_images": 300,
            "image_size": 400,
            "data_root": folder,
        }
    else:
        spec = {"name": "pascal5i", "data_root": str(Path(args.data_root).expanduser())}
    out = {}
    for lineage in ("pfenet", "hsnet"):
        protocol = resolve(lineage, "pascal5i")
        dataset = open_dataset(spec, protocol)
        split = dataset.train_split(protocol)
        classes = dataset.train_classes(args.fold)
        rows = {
            "its loader": official_loader_mix(dataset, protocol, split, classes),
            "official": sampler_mix(dataset, protocol, args.fold, "official", args.steps),
            "fsbench": sampler_mix(dataset, protocol, args.fold, "fsbench", args.steps),
        }
        out[lineage] = rows
        print(
            f"\n{lineage} protocol, fold {args.fold}, training list {split}: class share (%) of "
            f"the lineage's loader over one epoch (its rule) and of {args.steps} episodes of "
            "fsbench's samplers"
        )
        print(f"{'class':>6}" + "".join(f"{name:>12}" for name in rows))
        for c in classes:
            print(f"{c:>6}" + "".join(f"{100 * mix[c]:>12.1f}" for mix in rows.values()))
    return out


if __name__ == "__main__":
    main()
