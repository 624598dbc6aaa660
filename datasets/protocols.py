"""Named, frozen evaluation protocols: every run records which one it used (DESIGN §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fsbench.core import FsbenchError


@dataclass(frozen=True)
class Protocol:
    """The switches on which few-shot segmentation codebases disagree."""

    name: str
    input_size: int  # square side of the network input
    resize: str  # the lineage's test transform, datasets/resize.py: square | square_floor_nearest
    # | keep_ratio_pad
    score_resolution: str  # "input": labels resized (nearest) to the input; "original": not
    episodes: int  # test episodes per fold and seed
    seeds: tuple[int, ...]  # test seeds (one manifest each)
    pascal_train_list: str  # ImageSets/Segmentation/<list>.txt, or a shipped list, for training
    pascal_test_list: str  # ... and for the test episodes
    coco_split: str  # "consecutive" (fold i = classes 20i+1..20i+20) or "interleaved"
    coco_test_images: str  # "train" or "val" (the 2014 image set the test episodes draw from)
    coco_crowd: str  # crowd regions: "keep" (part of the class), "ignore" (255) or "skip"
    min_object_pixels: int  # an image counts for a class only with at least this many pixels
    only_present_classes: bool  # PANet's metric: count a class only where the query label has it
    # Whose test script's episodes `sampler: official` replays (datasets/replay.py); None: the
    # protocol has no official script, and its cells use fsbench's own sampler.
    official_sampler: str | None = None
    coco_input_size: int = 0  # COCO-20i's input side when it differs (0: input_size)
    coco_episodes: int = 0  # ... and its episode count (0: episodes)
    fss_episodes: int = 0  # FSS-1000's episode count (0: episodes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_dataset(self, dataset_name: str) -> Protocol:
        """The preset as it applies to a dataset: PFENet tests COCO at 641 px on 20001 episodes,
        HSNet tests FSS-1000 on its 2400 test images."""
        if "fss" in dataset_name:
            return dataclasses.replace(self, episodes=self.fss_episodes or self.episodes)
        if "coco" not in dataset_name:
            return self
        return dataclasses.replace(
            self,
            input_size=self.coco_input_size or self.input_size,
            episodes=self.coco_episodes or self.episodes,
        )

    def replays(self, dataset_name: str | None = None) -> bool:
        """Whether the official test script of this protocol can be replayed on the dataset."""
        if not self.official_sampler:
            return False
        kinds = OFFICIAL_DATASETS[self.official_sampler]
        return dataset_name is None or any(kind in dataset_name for kind in kinds)

    def default_sampler(self, dataset_name: str | None = None) -> str:
        return "official" if self.replays(dataset_name) else "fsbench"


# The datasets (by name) whose official test episodes each lineage's script draws.
OFFICIAL_DATASETS = {
    "panet": ("pascal", "coco"),
    "pfenet": ("pascal", "coco"),
    "hsnet": ("pascal", "coco", "fss"),
}


# `official`: the episodes the protocol's own test script draws (datasets/replay.py), the default
# of every named protocol; `fsbench`: fsbench's sampler (distinct supports, one seeded generator).
SAMPLERS = ("official", "fsbench")


def check_sampler(sampler: str, protocol: Protocol, dataset_name: str | None = None) -> str:
    if sampler not in SAMPLERS:
        raise FsbenchError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "official" and not protocol.replays(dataset_name):
        where = f" on {dataset_name}" if dataset_name and protocol.official_sampler else ""
        raise FsbenchError(
            f"protocol {protocol.name!r} has no official test script to replay{where}; "
            "use sampler: fsbench"
        )
    return sampler


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
        official_sampler="panet",
    ),
    # PFENet test.py with its configs (resized_val, ori_resize): val list, seed 321, 5001 scored
    # episodes (20001 on COCO, at 641 px), labels at original resolution.
    "pfenet": Protocol(
        name="pfenet",
        input_size=473,
        resize="keep_ratio_pad",  # PFENet Resize: longer side to 473, sides floored to ×8, pad
        score_resolution="original",
        episodes=5001,
        seeds=(321,),
        pascal_train_list="pfenet_noduplicate",  # PFENet lists/pascal (5953 images)
        pascal_test_list="val",
        coco_split="interleaved",
        coco_test_images="val",
        coco_crowd="ignore",  # our choice: their label PNGs were made offline (see README)
        min_object_pixels=2 * 32 * 32,
        only_present_classes=False,
        official_sampler="pfenet",
        coco_input_size=641,
        coco_episodes=20001,
    ),
    # HSNet test.py: 1000 episodes, seed 0, 400x400, labels resized (torch nearest) by default.
    "hsnet": Protocol(
        name="hsnet",
        input_size=400,
        resize="square_floor_nearest",
        score_resolution="input",
        episodes=1000,
        seeds=(0,),
        pascal_train_list="hsnet_trn",  # HSNet data/splits/pascal/trn fold lists
        pascal_test_list="val",
        coco_split="interleaved",
        coco_test_images="val",
        coco_crowd="ignore",  # our choice: their label PNGs were made offline (see README)
        min_object_pixels=1,
        only_present_classes=False,
        official_sampler="hsnet",
        fss_episodes=2400,  # its FSS-1000 test loader walks all 240 × 10 test images
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FsbenchError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
