"""Named, frozen evaluation protocols: every run records which one it used."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fsbench.core import FsbenchError
from fsbench.datasets.registry import dataset_class


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
    # Workers of the replayed test loader when its config differs from the lineage's (PFENet's
    # val loader: 8 on PASCAL, 16 on COCO; BAM's and HDMNet's: 8 on both); 0: the lineage's.
    replay_workers: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Protocol:
        """A resolved protocol as a cell record or a task config carries it (keys of earlier
        versions that are no longer fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["seeds"] = tuple(values.get("seeds", ()))
        return cls(**values)


# `official`: the episodes the protocol's own test script draws (datasets/replay.py), the default
# of every named protocol; `fsbench`: fsbench's sampler (distinct supports, one seeded generator).
SAMPLERS = ("official", "fsbench")


def resolve(protocol: str | Protocol, dataset) -> Protocol:
    """The preset as it applies to a dataset (name, class or object), resolved once per cell:
    the dataset class owns its adjustments (COCO-20i's input size, FSS-1000's episode count)."""
    preset = get_protocol(protocol) if isinstance(protocol, str) else protocol
    return dataset_class(dataset).protocol_for(preset)


def replays(protocol: Protocol, dataset=None) -> bool:
    """Whether the protocol's official test script can be replayed on the dataset (any, if None)."""
    if not protocol.official_sampler:
        return False
    return dataset is None or protocol.official_sampler in dataset_class(dataset).replayed_by


def default_sampler(protocol: Protocol, dataset=None) -> str:
    return "official" if replays(protocol, dataset) else "fsbench"


def check_sampler(sampler: str | None, protocol: Protocol, dataset=None) -> str:
    """`sampler`, or the protocol's default on the dataset when None, checked."""
    sampler = sampler or default_sampler(protocol, dataset)
    if sampler not in SAMPLERS:
        raise FsbenchError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "official" and not replays(protocol, dataset):
        name = dataset if isinstance(dataset, str) else getattr(dataset, "name", None)
        where = f" on {name}" if name and protocol.official_sampler else ""
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
    ),
}


# BAM (chunbolang/BAM test.py) and HDMNet (Pbihao/HDMNet test.py): `setup_seed(123)` then
# `np.random.randint(0, 1000, n)` test seeds, each a run of PFENet's val-loader mechanics
# (torch seeded with the run's seed, 8 workers) stopped after `test_num` episodes, scored at the
# original label resolution; both print the best run ("Best_mIoU") beside the mean.
BAM_SEEDS = (510, 365, 382, 322, 988)  # np.random.seed(123); np.random.randint(0, 1000, 5)
HDMNET_SEEDS = (510, 365, 382, 322, 988, 98, 742, 17, 595, 106)  # … randint(0, 1000, 10)
PROTOCOLS["bam"] = dataclasses.replace(
    PROTOCOLS["pfenet"],
    name="bam",
    episodes=1000,
    seeds=BAM_SEEDS,
    coco_episodes=1000,  # test_num 1000 on both (its test.py), COCO at 641 px (its config)
    replay_workers=8,
)
PROTOCOLS["hdmnet"] = dataclasses.replace(
    PROTOCOLS["pfenet"],
    name="hdmnet",
    episodes=1000,
    seeds=HDMNET_SEEDS,
    coco_input_size=633,  # its coco_split*_manet.yaml val_size
    coco_episodes=10000,  # test_num 10000 on COCO (its test.py)
    replay_workers=8,
)


# PATNet (slei109/PATNet test.py): HSNet's test geometry (400 × 400, labels resized nearest,
# Evaluator's metric), `fix_randseed(0)`, 600 episodes on Deepglobe, ISIC and the chest X-rays
# (episode idx: class idx % n, datasets/cross_domain.py) and HSNet's 2400 on FSS-1000; its model
# trains on PASCAL with no held-out class (fold 4 = all 20 classes, HSNet's trn lists).
PROTOCOLS["patnet"] = dataclasses.replace(
    PROTOCOLS["hsnet"], name="patnet", episodes=600, official_sampler="patnet"
)


# Matcher (aim-uofa/Matcher main_oss.py) and GF-SAM (ANDYZAQ/GF-SAM main_eval.py), the
# foundation-model track: HSNet's test code (`fix_randseed(0)`, Resize((S, S)) then ToTensor,
# labels resized nearest, its Evaluator) with S = 518 (Matcher's --img-size; GF-SAM's is 1024, an
# entry's `input_size`); COCO-20i and FSS-1000 episodes are HSNet's (its coco.py and fss.py),
# LVIS-92i's its own lvis.py (2300 a fold, datasets/lvis.py).
PROTOCOLS["matcher"] = dataclasses.replace(
    PROTOCOLS["hsnet"], name="matcher", input_size=518, official_sampler="matcher"
)


def training_list_protocols() -> list[str]:
    """One protocol per distinct training list, the first that names it (bam and hdmnet train on
    PFENet's: a leakage audit of each list once)."""
    seen, names = set(), []
    for name, preset in PROTOCOLS.items():
        if preset.pascal_train_list not in seen:
            seen.add(preset.pascal_train_list)
            names.append(name)
    return names


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FsbenchError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
