"""Named, frozen evaluation protocols: every run records which one it used (DESIGN §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fsbench.datasets.registry import FsbenchError


@dataclass(frozen=True)
class Protocol:
    """The switches on which few-shot segmentation codebases disagree."""

    name: str
    input_size: int  # square side of the network input
    resize: str  # "square": stretch to input_size²; "keep_ratio_pad": longer side, then pad
    score_resolution: str  # "input": labels resized (nearest) to the input; "original": not
    episodes: int  # test episodes per fold and seed
    seeds: tuple[int, ...]  # test seeds (one manifest each)
    pascal_train_list: str  # ImageSets/Segmentation/<list>.txt used for training
    pascal_test_list: str  # ... and for the test episodes
    coco_split: str  # "consecutive" (fold i = classes 20i+1..20i+20) or "interleaved"
    coco_test_images: str  # "train" or "val" (the 2014 image set the test episodes draw from)
    coco_crowd: str  # crowd regions: "keep" (part of the class), "ignore" (255) or "skip"
    min_object_pixels: int  # an image counts for a class only with at least this many pixels
    only_present_classes: bool  # PANet's metric: count a class only where the query label has it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    # kaixin96/PANet test.py + util/metric.py: trainaug list for both phases, seeds 1234+run.
    "panet": Protocol(
        name="panet",
        input_size=417,
        resize="square",
        score_resolution="input",
        episodes=1000,
        seeds=(1234, 1235, 1236, 1237, 1238),
        pascal_train_list="trainaug",
        pascal_test_list="trainaug",
        coco_split="consecutive",
        coco_test_images="train",
        coco_crowd="keep",  # PANet's coco.py merges every annotation, crowd included
        min_object_pixels=1,
        only_present_classes=True,
    ),
    # PFENet test.py: val list, seed 321, 5000 episodes, labels at original resolution.
    "pfenet": Protocol(
        name="pfenet",
        input_size=473,
        resize="keep_ratio_pad",  # PFENet test_Resize: longer side to 473, pad (label 255)
        score_resolution="original",
        episodes=5000,
        seeds=(321,),
        pascal_train_list="trainaug",
        pascal_test_list="val",
        coco_split="interleaved",
        coco_test_images="val",
        coco_crowd="ignore",  # our choice: their label PNGs were made offline (see closing note)
        min_object_pixels=2 * 32 * 32,
        only_present_classes=False,
    ),
    # HSNet test.py: 1000 episodes, seed 0, 400x400, labels resized by default.
    "hsnet": Protocol(
        name="hsnet",
        input_size=400,
        resize="square",
        score_resolution="input",
        episodes=1000,
        seeds=(0,),
        pascal_train_list="trainaug",
        pascal_test_list="val",
        coco_split="interleaved",
        coco_test_images="val",
        coco_crowd="ignore",  # our choice: their label PNGs were made offline (see closing note)
        min_object_pixels=1,
        only_present_classes=False,
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FsbenchError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
