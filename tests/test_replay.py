"""Official episode replay: fsbench's manifests equal what the official test samplers drew.

tests/fixtures/official_episodes.json was recorded by tests/fixtures/record_official_episodes.py,
which runs kaixin96/PANet's voc_fewshot + fewShot (and its util/voc_classwise_filenames.py),
juhongm999/hsnet's DatasetPASCAL through its test DataLoader, and dvlab-research/PFENet's SemData
through an 8-worker DataLoader as its validate() loops, on the generated layout built below.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeManifest
from fsbench.datasets.pascal import Pascal5i
from fsbench.datasets.protocols import PROTOCOLS
from fsbench.datasets.replay import LISTS, official_episodes
from fsbench.datasets.synthetic import write_voc

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_episodes.json").read_text())


@pytest.fixture(scope="module")
def recorded_voc(tmp_path_factory):
    """The generated VOC layout the fixtures were recorded on (same generator, same data)."""
    root = tmp_path_factory.mktemp("replay_voc")
    data = FIXTURE["data"]
    write_voc(root, data["n_images"], data["image_size"], data["seed"])
    dataset = Pascal5i(root, cache_dir=tmp_path_factory.mktemp("replay_index"))
    fingerprints = {s: dataset.fingerprint(s) for s in ("trainaug", "val")}
    assert fingerprints == FIXTURE["dataset_fingerprint"], "generator changed: re-record"
    return root, dataset


def episodes(dataset, protocol, fold, way, shot, count, seed, sampler=None):
    manifest = EpisodeManifest.build(
        dataset, PROTOCOLS[protocol], fold, way, shot, count, seed, sampler=sampler
    )
    return manifest, [e.to_json() for e in manifest.episodes]


@pytest.mark.parametrize("run", range(len(FIXTURE["panet"]["sorted_lists"])))
def test_panet_replay_equals_official_sampler_over_built_lists(recorded_voc, run):
    """No class<N>.txt in the data root: fsbench builds them over sorted label files; PANet's
    sampler given those sorted lists drew the recorded episodes."""
    _, dataset = recorded_voc
    record = FIXTURE["panet"]["sorted_lists"][run]
    manifest, mine = episodes(
        dataset, "panet", 0, record["way"], record["shot"], 60, record["seed"]
    )
    assert mine == record["episodes"]
    assert manifest.sampler == "official:panet" and manifest.spec["lists"].startswith("built")


def test_panet_replay_reads_the_class_files_panet_wrote(recorded_voc, tmp_path):
    """With the class<N>.txt files PANet's script wrote (directory-listing order, not sorted),
    the replay reads them and equals the official draws made from them, seed by seed."""
    root, _ = recorded_voc
    copy = tmp_path / "VOC2012"
    copy.mkdir()
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationObjectAug"):
        (copy / sub).symlink_to(voc / sub)
    shutil.copytree(voc / "ImageSets", copy / "ImageSets")
    folder = copy / "ImageSets" / "Segmentation" / "trainaug"
    folder.mkdir()
    files = FIXTURE["panet"]["class_files"]
    assert any(lines != sorted(lines) for lines in files.values())  # order matters here
    for name, lines in files.items():
        (folder / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
    dataset = Pascal5i(tmp_path, cache_dir=tmp_path / "index")
    for record, built in zip(FIXTURE["panet"]["official_files"], FIXTURE["panet"]["sorted_lists"]):
        manifest, mine = episodes(
            dataset, "panet", 0, record["way"], record["shot"], 60, record["seed"]
        )
        assert mine == record["episodes"] != built["episodes"]
        assert manifest.spec["lists"].startswith("official files")
    (folder / "class3.txt").unlink()
    with pytest.raises(FsbenchError, match="class3.txt: missing"):
        episodes(dataset, "panet", 0, 1, 1, 5, 1234)


@pytest.mark.parametrize("run", range(len(FIXTURE["hsnet"]["runs"])))
def test_hsnet_replay_equals_official_sampler(recorded_voc, run):
    _, dataset = recorded_voc
    record = FIXTURE["hsnet"]["runs"][run]
    from fsbench.datasets.replay import hsnet_pascal_lines

    assert (
        hsnet_pascal_lines(dataset, "val", record["fold"])
        == (FIXTURE["hsnet"]["lists"][str(record["fold"])])
    )
    manifest, mine = episodes(dataset, "hsnet", record["fold"], 1, record["shot"], 60, 0)
    assert mine == record["episodes"]
    assert manifest.sampler == "official:hsnet"


@pytest.mark.parametrize("run", range(len(FIXTURE["pfenet"]["runs"])))
def test_pfenet_replay_equals_official_sampler_across_passes(recorded_voc, run):
    """8 DataLoader workers, a torch base seed per pass: the recorded episodes cross two pass
    boundaries (each pass re-seeds every worker)."""
    _, dataset = recorded_voc
    record = FIXTURE["pfenet"]["runs"][run]
    count = len(record["episodes"])
    assert count > 2 * record["queries"]
    manifest, mine = episodes(dataset, "pfenet", record["fold"], 1, record["shot"], count, 321)
    assert mine == record["episodes"]
    # --episodes 5000 of a 5001-episode protocol is its prefix
    _, shorter = episodes(dataset, "pfenet", record["fold"], 1, record["shot"], count - 3, 321)
    assert shorter == mine[:-3]


def test_bam_and_hdmnet_replay_pfenets_loader_with_their_own_seeds(recorded_voc):
    """BAM's and HDMNet's test.py: seeds from `setup_seed(123)` + `np.random.randint(0, 1000,
    n)`, each run PFENet's val-loader mechanics (8 workers) seeded with it, cut to `test_num`:
    on PASCAL their episodes for a seed are the pfenet replay's with that seed, in order."""
    import numpy as np

    legacy = np.random.RandomState(123)
    assert PROTOCOLS["hdmnet"].seeds == tuple(int(s) for s in legacy.randint(0, 1000, 10))
    assert PROTOCOLS["bam"].seeds == PROTOCOLS["hdmnet"].seeds[:5] == (510, 365, 382, 322, 988)
    assert PROTOCOLS["bam"].episodes == PROTOCOLS["hdmnet"].episodes == 1000
    _, dataset = recorded_voc
    record = FIXTURE["pfenet"]["runs"][0]
    count = len(record["episodes"])
    for seed in PROTOCOLS["bam"].seeds[:2]:
        _, pfenet = episodes(dataset, "pfenet", record["fold"], 1, record["shot"], count, seed)
        for name in ("bam", "hdmnet"):
            manifest, theirs = episodes(
                dataset, name, record["fold"], 1, record["shot"], count, seed
            )
            assert theirs == pfenet and manifest.spec["protocol"] == name
    assert pfenet != episodes(dataset, "pfenet", record["fold"], 1, record["shot"], count, 321)[1]


@pytest.fixture(scope="module")
def recorded_coco(tmp_path_factory):
    from fsbench.datasets.coco import Coco20i
    from fsbench.datasets.synthetic_coco import write_coco

    root = tmp_path_factory.mktemp("replay_coco")
    data = FIXTURE["coco_data"]
    write_coco(root, data["n_images"], data["image_size"], data["seed"])
    cache = tmp_path_factory.mktemp("replay_coco_index")
    return {p: Coco20i(root, protocol=p, cache_dir=cache) for p in ("panet", "hsnet")}


@pytest.mark.parametrize("run", range(len(FIXTURE["panet_coco"])))
def test_panet_coco_replay_equals_official_sampler(recorded_coco, run):
    """PANet's coco_fewshot: per-category image ids as pycocotools returns them."""
    record = FIXTURE["panet_coco"][run]
    _, mine = episodes(
        recorded_coco["panet"], "panet", record["fold"], 1, record["shot"], 60, record["seed"]
    )
    assert mine == record["episodes"]


@pytest.mark.parametrize("run", range(len(FIXTURE["hsnet_coco"]["runs"])))
def test_hsnet_coco_replay_equals_official_sampler(recorded_coco, run):
    """HSNet's DatasetCOCO: a class, a query of it, then supports, from the global numpy RNG."""
    record = FIXTURE["hsnet_coco"]["runs"][run]
    manifest, mine = episodes(
        recorded_coco["hsnet"], "hsnet", record["fold"], 1, record["shot"], 60, 0
    )
    assert manifest.spec["lists"].startswith("built")
    assert mine == record["episodes"]


def test_fsbench_sampler_stays_available_and_is_recorded(recorded_voc):
    _, dataset = recorded_voc
    official, first = episodes(dataset, "panet", 0, 1, 1, 20, 1234)
    own, second = episodes(dataset, "panet", 0, 1, 1, 20, 1234, sampler="fsbench")
    assert first != second
    assert own.sampler == "fsbench" and "sampler" not in own.spec  # version-1 form, unchanged
    assert official.spec["version"] == 2 and official.fingerprint != own.fingerprint
    with pytest.raises(FsbenchError, match="1-way"):
        official_episodes(dataset, PROTOCOLS["hsnet"], 0, 2, 1, 5, 0)
    with pytest.raises(FsbenchError, match="sampler 'mine'"):
        episodes(dataset, "panet", 0, 1, 1, 5, 1, sampler="mine")


def test_pfenet_sampler_that_would_loop_forever_is_a_clear_error(dataset):
    """The session dataset's 64-px images have no object of PFENet's 2048 pixels."""
    with pytest.raises(FsbenchError, match="PFENet's val list would be empty"):
        episodes(dataset, "pfenet", 0, 1, 1, 5, 321)


PUBLISHED_LINES = {
    "hsnet/pascal/val": [346, 451, 725, 346],
    "hsnet/pascal/trn": [2286, 3425, 5883, 2086],
}


def test_shipped_lists_load_and_match_their_published_line_counts():
    for folder, counts in PUBLISHED_LINES.items():
        for fold, count in enumerate(counts):
            lines = (LISTS / folder / f"fold{fold}.txt").read_text().split("\n")[:-1]
            assert len(lines) == count
            assert all(len(line.split("__")) == 2 and 1 <= int(line[-2:]) <= 20 for line in lines)
    fss = {
        name: (LISTS / "hsnet" / "fss" / f"{name}.txt").read_text().split()
        for name in ("trn", "val", "test")
    }
    assert [len(fss[n]) for n in ("trn", "val", "test")] == [520, 240, 240]
    assert not set(fss["trn"]) & set(fss["test"])
    pfenet = LISTS / "pfenet" / "pascal"
    assert len((pfenet / "val.txt").read_text().splitlines()) == 1449
    assert len((pfenet / "voc_sbd_merge_noduplicate.txt").read_text().splitlines()) == 5953
    entries = {}
    for split in ("val", "trn"):
        for fold in range(4):
            raw = json.loads(
                gzip.decompress(
                    (LISTS / "hsnet" / "coco" / f"{split}_fold{fold}.json.gz").read_bytes()
                )
            )
            entries[split, fold] = sum(len(v) for v in raw["classes"].values())
            held_out = {fold + 4 * v for v in range(20)}
            classes = {int(c) for c in raw["classes"]}
            assert classes == held_out if split == "val" else classes == set(range(80)) - held_out
    assert [entries["val", f] for f in range(4)] == [35783, 17912, 14563, 14315]
    assert [entries["trn", f] for f in range(4)] == [95476, 133927, 141054, 141016]


def test_shipped_training_lists_apply_when_the_dataset_holds_their_images(
    voc_root, tmp_path, monkeypatch
):
    """PFENet's and HSNet's training lists are used when every listed image is there (the real
    VOC); HSNet's pairs restrict each class to the images listed with it; generated data (none
    of the real ids) falls back to trainaug."""
    import fsbench.datasets.pascal as pascal

    dataset = Pascal5i(voc_root, cache_dir=tmp_path / "index")
    assert dataset.train_split(PROTOCOLS["hsnet"]) == "trainaug"  # real HSNet ids are absent
    assert dataset.train_split(PROTOCOLS["pfenet"]) == "trainaug"
    ids = dataset.list_ids("trainaug")
    with_6 = dataset.class_images("trainaug", 6)
    listed = with_6[: len(with_6) // 2]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "pairs.txt").write_text("".join(f"{i}__06\n" for i in listed))
    (tmp_path / "lists" / "plain.txt").write_text(
        "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids[:40])
    )
    monkeypatch.setattr(pascal, "LISTS", tmp_path / "lists")
    monkeypatch.setattr(
        pascal,
        "SHIPPED_TRAIN_LISTS",
        {"hsnet_trn": ("pairs.txt",), "pfenet_noduplicate": ("plain.txt",)},
    )
    fresh = Pascal5i(voc_root, cache_dir=tmp_path / "index")
    assert fresh.train_split(PROTOCOLS["hsnet"]) == "hsnet_trn"
    assert fresh.class_images("hsnet_trn", 6) == sorted(listed)
    assert fresh.class_images("hsnet_trn", 7) == []  # no pair lists class 7
    assert fresh.train_split(PROTOCOLS["pfenet"]) == "pfenet_noduplicate"
    assert fresh.list_ids("pfenet_noduplicate") == sorted(ids[:40])


@pytest.mark.parametrize("run", range(len(FIXTURE["hsnet_fss"]["runs"])))
def test_hsnet_fss_replay_equals_official_sampler(tmp_path_factory, run):
    """HSNet's DatasetFSS on a generated FSS-1000 layout (a subset of its class folders): every
    test image once as the query, supports numbered 1…10 drawn until they differ from it."""
    from fsbench.datasets.fss import Fss1000, write_fss

    root = tmp_path_factory.getbasetemp() / "replay_fss"
    if not root.exists():
        data = FIXTURE["fss_data"]
        write_fss(root, data["n_images"], data["image_size"], data["seed"])
    dataset = Fss1000(root)
    record = FIXTURE["hsnet_fss"]["runs"][run]
    count = len(record["episodes"])
    assert count == len(dataset.list_ids("test"))
    manifest, mine = episodes(dataset, "hsnet", 0, 1, record["shot"], count, 0)
    assert mine == record["episodes"] and manifest.sampler == "official:hsnet"
    assert {c for e in mine for c in e["classes"]} <= set(range(761, 1001))  # HSNet's test ids
    with pytest.raises(FsbenchError, match="no official test script to replay on fss1000"):
        episodes(dataset, "panet", 0, 1, 1, 5, 1234, sampler="official")
    _, own = episodes(dataset, "panet", 0, 1, 1, 5, 1234)  # default there: fsbench's sampler
    assert all(e["query"][0] not in e["support"][0] for e in own)
