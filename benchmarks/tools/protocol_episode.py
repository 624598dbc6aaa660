"""Score one PASCAL-5i episode under each named protocol, to show why their numbers differ.

    python -m fsbench.benchmarks.tools.protocol_episode [--results results] [--grid quickstart]

Uses the trained PANet of the grid's fold-0 1-shot cell when its checkpoint exists (else an
untrained narrow PANet), and one fixed episode (the first of the fold-0 1-shot manifest drawn
from the images both test lists share the class with). Prints per protocol its switches and the
episode's class IoU and FB-IoU.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fsbench.benchmarks.cli.qualitative import cell_model
from fsbench.benchmarks.evaluation.evaluate import evaluate
from fsbench.benchmarks.execution.tasks import build_model
from fsbench.benchmarks.store.records import read_cells
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import PROTOCOLS
from fsbench.datasets.registry import open_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--grid", default="quickstart")
    args = parser.parse_args(argv)
    config = {
        "method": "panet",
        "method_kwargs": {"width": 0.125},
        "train": {"seed": 0},
        "dataset": {"name": "synthetic_pascal5i", "n_images": 600, "image_size": 128},
    }
    model = build_model(config)
    source = "untrained narrow PANet"
    grid_dir = Path(args.results, args.grid)
    for cell in read_cells(grid_dir / "cells"):
        c = cell.config
        if (c.method, c.fold, c.shot) == ("panet", 0, 1) and cell.checkpoint:
            config, model = c.to_json(), cell_model(cell, grid_dir)
            source = f"trained PANet of {args.grid} ({c.row}, fold 0, 1-shot)"
    dataset = open_dataset(config["dataset"])
    # One episode whose images are in every protocol's test list: PFENet's first val episode,
    # objects of any size allowed (the generated images are too small for 2·32·32 px).
    base = dataclasses.replace(PROTOCOLS["pfenet"], min_object_pixels=1)
    episode = EpisodeManifest.build(dataset, base, 0, 1, 1, 1, 321)
    print(
        f"model: {source}; episode: class {episode.episodes[0].classes[0]}, support "
        f"{episode.episodes[0].support[0][0]}, query {episode.episodes[0].query[0]}"
    )
    print(
        f"{'protocol':<9}{'input':>6} {'resize':<21}{'scored at':<11}{'metric':<14}"
        f"{'class IoU':>10}{'FB-IoU':>8}"
    )
    for name, protocol in PROTOCOLS.items():
        loader = EpisodeLoader(dataset, protocol.input_size, resize=protocol.resize)
        counts, _, _ = evaluate(model, loader, episode, protocol)
        metric = "PANet (present)" if protocol.only_present_classes else "standard"
        print(
            f"{name:<9}{protocol.input_size:>6} {protocol.resize:<21}"
            f"{protocol.score_resolution:<11}{metric:<14}{100 * counts.miou():>10.2f}"
            f"{100 * counts.fb_iou():>8.2f}"
        )


if __name__ == "__main__":
    main()
