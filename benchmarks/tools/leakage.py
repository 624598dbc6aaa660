"""Novel-class leakage of the PASCAL-5i training lists, BAM's finding, counted two ways.

    python -m fsbench.benchmarks.tools.leakage [--data-root DIR] [--folds 0 1 2 3]

Without images: from the shipped lists alone. HSNet's `trn/fold{i}.txt` pair each SBD-aug
training image with every class it holds (HSNet built them from the real labels), so a training
image of test fold f (listed under another fold's class) that is also listed under one of fold f's
classes holds novel-class pixels; PFENet's list is read through the same pairs. With `--data-root`
(a VOC2012 + SBD-aug folder, or a generated one): the audit every report writes (leakage.md),
counted from the label files, with pixel shares, under each protocol's training list.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from fsbench.core import FsbenchError, one_line
from fsbench.datasets.leakage import ShippedPascalLists, audit
from fsbench.datasets.protocols import resolve, training_list_protocols
from fsbench.datasets.registry import open_dataset


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="VOC2012 + SBD-aug folder (or a generated one)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    try:
        return _report(args)
    except FsbenchError as error:  # a dataset that is missing, unreadable or mislabelled
        print(f"leakage: error: {one_line(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None


def _report(args) -> pd.DataFrame:
    bad = [f for f in args.folds if not 0 <= f <= 3]
    if bad:
        raise FsbenchError(f"--folds {' '.join(map(str, bad))}: PASCAL-5i folds are 0, 1, 2 and 3")
    if args.data_root is None:
        frame = pd.DataFrame(r for r in ShippedPascalLists().rows() if r["fold"] in args.folds)
        source = "the shipped lists alone (class membership from HSNet's trn pairs)"
    else:
        rows = []
        for name in training_list_protocols():  # each training list once
            preset = resolve(name, "pascal5i")
            dataset = open_dataset({"name": "pascal5i", "data_root": args.data_root}, preset)
            rows += [audit(dataset, preset, fold) for fold in args.folds]
        frame = pd.DataFrame(rows)
        source = f"the label files under {args.data_root}"
    if frame.empty:
        raise FsbenchError(f"no training images to audit in {source}; check --data-root")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    worst = frame.loc[frame["share_of_images"].idxmax()]
    print(
        f"leakage from {source}: up to {worst['share_of_images']:.1f}% of a fold's training "
        f"images hold novel-class pixels (fold {worst['fold']}, {worst['train_list']})"
    )
    return frame


if __name__ == "__main__":
    main()
