"""PATNet's cross-domain test sets (Deepglobe, ISIC 2018, chest X-ray) in its layouts, its test
episodes replayed draw for draw (fixtures recorded by running PATNet's own data/*.py: see
tests/fixtures/record_official_patnet.py), `fsbench prepare`, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsbench.benchmarks.cli.main import main
from fsbench.core import FsbenchError
from fsbench.datasets.cross_domain import (
    ChestXray,
    Deepglobe,
    Isic2018,
    write_chest,
    write_deepglobe,
    write_isic,
)
from fsbench.datasets.cross_domain_prepare import prepare_deepglobe, prepare_isic
from fsbench.datasets.manifests import EpisodeManifest
from fsbench.datasets.protocols import PROTOCOLS, resolve

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "official_patnet_episodes.json").read_text()
)
WRITERS = {"deepglobe": write_deepglobe, "isic2018": write_isic, "chest_xray": write_chest}
CLASSES = {"deepglobe": Deepglobe, "isic2018": Isic2018, "chest_xray": ChestXray}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdfsl")
    for name, (n, size, seed) in FIXTURE["data"].items():
        WRITERS[name](root, n, size, seed)
    return root


@pytest.mark.parametrize("run", range(len(FIXTURE["runs"])))
def test_patnet_replay_equals_its_own_test_loader(generated, run):
    record = FIXTURE["runs"][run]
    dataset = CLASSES[record["dataset"]](generated)
    protocol = resolve("patnet", dataset)
    assert protocol.episodes == len(record["episodes"]) == 600
    manifest = EpisodeManifest.build(dataset, protocol, 0, 1, record["shot"], 600, 0)
    assert [e.to_json() for e in manifest.episodes] == record["episodes"]
    assert manifest.sampler == "official:patnet"


def test_patnet_protocol_is_hsnets_geometry_with_its_episode_counts():
    patnet, hsnet = PROTOCOLS["patnet"], PROTOCOLS["hsnet"]
    assert (patnet.input_size, patnet.resize, patnet.score_resolution) == (
        hsnet.input_size, hsnet.resize, hsnet.score_resolution
    )  # fmt: skip
    assert patnet.seeds == (0,) and patnet.episodes == 600
    assert resolve("patnet", "fss1000").episodes == 2400  # HSNet's FSS-1000 code


def test_manifest_cli_writes_patnets_episodes(generated, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["manifest", "--dataset", "deepglobe", "--data-root", str(generated)]
    argv += ["--protocol", "patnet", "--fold", "0", "--shot", "5", "--seed", "0"]
    argv += ["--output", str(out)]
    assert main(argv) == 0
    assert "official:patnet" in capsys.readouterr().out
    written = json.loads(out.read_text())["episodes"]
    record = next(r for r in FIXTURE["runs"] if r["dataset"] == "deepglobe" and r["shot"] == 5)
    assert written == record["episodes"]


def test_chest_xray_lists_the_masks_not_the_images(generated):
    dataset = ChestXray(generated)
    ids = dataset.list_ids("test")
    assert all(i.endswith("_mask") for i in ids) and len(ids) == 20
    assert dataset.image_path(ids[0]).name == ids[0][: -len("_mask")] + ".png"
    assert "MCUCXR_9999_0" not in " ".join(ids)  # an image without a mask never enters


def _copy(generated: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    shutil.copytree(generated / name, tmp_path / name)
    return tmp_path


def test_a_deepglobe_tile_without_its_mask_is_one_line(generated, tmp_path):
    root = _copy(generated, tmp_path, "Deepglobe")
    victim = next((root / "Deepglobe" / "3" / "test" / "groundtruth").glob("*.png"))
    victim.unlink()
    with pytest.raises(FsbenchError, match=f"tile without its mask .*{victim.name}"):
        Deepglobe(root)


def test_a_chest_mask_whose_image_is_missing_is_one_line(generated, tmp_path):
    root = _copy(generated, tmp_path, "LungSegmentation")
    image = sorted((root / "LungSegmentation" / "CXR_png").glob("CHN*.png"))[0]
    image.unlink()
    with pytest.raises(FsbenchError, match=f"mask whose image .*{image.name} is missing"):
        ChestXray(root)


def test_a_mask_that_is_not_0_255_is_refused_not_thresholded(generated, tmp_path):
    root = _copy(generated, tmp_path, "Deepglobe")
    dataset = Deepglobe(root)
    image_id = dataset.list_ids("test")[0]
    path = dataset.mask_path(image_id)
    values = np.asarray(Image.open(path)).copy()
    values[0, 0] = (200, 200, 200)  # a compressed edge
    Image.fromarray(values).save(path)
    with pytest.raises(FsbenchError, match=f"{path.name}: a binary mask holds only 0 and 255"):
        Deepglobe(root).load_masks(image_id, [dataset.class_of(image_id)])


def test_fold_other_than_0_and_training_on_a_test_set_are_refused(generated):
    dataset = Isic2018(generated)
    with pytest.raises(FsbenchError, match="one fold"):
        dataset.fold_classes(1)
    assert dataset.train_classes(0) == []


def _raw_deepglobe(folder: Path) -> None:
    """Two 'land-cover training' images of 60 × 60 px (6 × 6 tiles of 10 px) with colour-coded
    masks as Deepglobe's: colour A left of column 35, colour B right of it, so only the tiles
    of tile-column 3 hold two colours; tile (0, 3) also has one black pixel (under 4.8 %)."""
    folder.mkdir(parents=True)
    pairs = [((0, 255, 255), (255, 0, 255)), ((255, 255, 0), (0, 255, 0))]
    for index, (left, right) in enumerate(pairs):
        mask = np.zeros((60, 60, 3), np.uint8)
        mask[:, :35], mask[:, 35:] = left, right
        mask[0, 30] = (0, 0, 0)
        Image.fromarray(mask).save(folder / f"{100 + index}_mask.png")
        Image.fromarray(np.full((60, 60, 3), 90 + index, np.uint8)).save(
            folder / f"{100 + index}_sat.jpg"
        )


def test_prepare_deepglobe_tiles_filters_and_splits_by_class(tmp_path):
    _raw_deepglobe(tmp_path / "raw" / "train")
    counts = prepare_deepglobe(tmp_path / "raw", tmp_path / "out")
    # PATNet's labelset read as BGR: cyan = urban (2), magenta = rangeland (3), yellow =
    # agriculture (1), green = forest (4); 5 kept tiles per image (column 3, rows 1…5)
    assert counts == {1: 5, 2: 5, 3: 5, 4: 5, 5: 0, 6: 0}
    dataset = Deepglobe(tmp_path / "out")
    assert dataset.class_images("test", 2) == [f"2/100_{i}3" for i in range(1, 6)]
    masks, _ = dataset.load_masks("2/100_13", [2])
    expected = np.zeros((10, 10), bool)
    expected[:, :5] = True  # columns 30…34 of the image: urban
    assert (masks[0] == expected).all()
    with pytest.raises(FsbenchError, match="no <id>_mask.png"):
        prepare_deepglobe(tmp_path / "out", tmp_path / "again")


def test_prepare_isic_splits_by_lesion_type_and_names_a_missing_id(tmp_path, generated):
    raw = tmp_path / "raw"
    (raw / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    (raw / "ISIC2018_Task1_Training_GroundTruth").mkdir(parents=True)
    source = generated / "ISIC"
    kinds = {1: "seborrheic_keratosis", 2: "nevus", 3: "melanoma"}
    lines = ["ID,Class"]
    for image in sorted(source.glob("ISIC2018_Task1-2_Training_Input/*/*.jpg")):
        (raw / "ISIC2018_Task1-2_Training_Input" / image.name).write_bytes(image.read_bytes())
        mask = source / "ISIC2018_Task1_Training_GroundTruth" / f"{image.stem}_segmentation.png"
        (raw / "ISIC2018_Task1_Training_GroundTruth" / mask.name).write_bytes(mask.read_bytes())
        lines.append(f"{image.stem},{kinds[int(image.parent.name)]}")
    (raw / "class_id.csv").write_text("\n".join(lines[:-1]) + "\n")  # the last id left out
    missing = lines[-1].split(",")[0]
    with pytest.raises(FsbenchError, match=f"ISIC id {missing} is not in the class CSV"):
        prepare_isic(raw, tmp_path / "out")
    (raw / "class_id.csv").write_text("\n".join(lines) + "\n")
    counts = prepare_isic(raw, tmp_path / "out")
    assert counts == {1: 10, 2: 10, 3: 10}
    assert Isic2018(tmp_path / "out").list_ids("test") == Isic2018(generated).list_ids("test")


def test_prepare_cli_and_its_one_line_errors(tmp_path, capsys):
    _raw_deepglobe(tmp_path / "raw")
    assert main(["prepare", "deepglobe", str(tmp_path / "raw"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "deepglobe: 20 images written" in out and "class 2: 5" in out
    assert main(["prepare", "isic2018", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: not a folder" in err[0]
    assert main(["prepare", "isic2018", str(tmp_path / "raw"), str(tmp_path / "o2")]) == 2
    assert "ISIC2018_Task1-2_Training_Input: missing" in capsys.readouterr().err


CONFIGS = Path(__file__).parents[1] / "benchmarks" / "configs"


def test_the_cross_domain_grid_shares_one_model_across_its_test_sets():
    from fsbench.benchmarks.grid.files import load_grid

    cells = load_grid(CONFIGS / "cross_domain.yaml").expand()
    assert len(cells) == 4 * 4 * 2  # methods × test sets × shots
    keys = {}
    for cell in cells:
        keys.setdefault(cell.method.name, set()).add(cell.model_key())
    # HSNet and PATNet: one 1-shot model for all four sets and both shots; the others one per shot
    assert {k: len(v) for k, v in keys.items()} == {
        "panet": 2,
        "pfenet": 2,
        "hsnet": 1,
        "patnet": 1,
    }
    sizes = {c.method.name: c.input_size for c in cells}
    assert sizes == {"panet": 400, "pfenet": 401, "hsnet": 400, "patnet": 400}  # PFENet's rule
    episodes = {c.dataset["name"]: c.episodes for c in cells}
    assert episodes == {"deepglobe": 600, "isic2018": 600, "chest_xray": 600, "fss1000": 2400}
    patnet = next(c for c in cells if c.method.name == "patnet")
    assert patnet.train.fold == "all" and patnet.train.training_data["name"] == "pascal5i"
    assert patnet.title.startswith("PATNet · deepglobe · 1-shot")


def test_impossible_cross_domain_training_settings_are_one_line():
    from fsbench.benchmarks.grid.files import parse_grid

    base = {"name": "g", "dataset": ["deepglobe"], "methods": ["patnet"], "folds": [0]}
    with pytest.raises(FsbenchError, match="fold='3' \\(all: every class"):
        parse_grid({**base, "train": {"fold": "3"}})
    with pytest.raises(FsbenchError, match="train.dataset: expected a dataset mapping"):
        parse_grid({**base, "train": {"dataset": "pascal5i"}})
    with pytest.raises(FsbenchError, match="dataset: an empty list"):
        parse_grid({**base, "dataset": []})
    pfenet = {**base, "protocol": "patnet", "methods": [{"name": "pfenet"}]}
    with pytest.raises(FsbenchError, match="pfenet: protocol patnet's input size 400 does not"):
        parse_grid(pfenet).expand()
    with pytest.raises(FsbenchError, match="input_size 7 is not a side of 16…4096 px"):
        parse_grid({**pfenet, "methods": [{"name": "pfenet", "input_size": 7}]})
    cells = parse_grid({**pfenet, "methods": [{"name": "pfenet", "input_size": 401}]}).expand()
    assert {c.input_size for c in cells} == {401}


def test_paper_rows_of_the_cross_domain_table():
    import pandas as pd

    from fsbench.benchmarks.report.tables import reported_rows

    sets = ["deepglobe", "isic2018", "chest_xray", "fss1000"]
    frame = pd.DataFrame(
        [{"dataset": d, "protocol": "patnet", "annotation": "mask", "way": 1} for d in sets]
    )
    columns = [("1-shot", d) for d in sets] + [("1-shot", "Mean")]
    rows = reported_rows(frame, "miou", columns)
    patnet = rows.loc[next(i for i in rows.index if i.startswith("PATNet (reported)"))]
    assert list(patnet) == ["37.9*", "41.2*", "66.6*", "78.6*", "56.1*"]
    single = frame[frame["dataset"] == "deepglobe"]  # a one-dataset grid: no cross-domain rows
    assert not any("PATNet" in i for i in reported_rows(single, "miou", columns[:1]).index)


@pytest.mark.slow
def test_cross_domain_smoke_trains_on_pascal_once_and_tables_every_test_set(tmp_path, capsys):
    args = ["run", str(CONFIGS / "cross_domain.yaml"), "--smoke", "--serial", "--no-tracking"]
    assert main([*args, "--results", str(tmp_path)]) == 0
    grid = tmp_path / "cross_domain_smoke"
    records = [json.loads(p.read_text()) for p in (grid / "cells").glob("*.json")]
    assert len(records) == 32
    patnet = [r for r in records if r["config"]["method"] == "patnet"]
    assert {r["train"]["train_classes"] == list(range(1, 21)) for r in patnet} == {True}
    fingerprints = {r["config"]["dataset"]["name"]: r["seeds"][0]["manifest_fingerprint"]
                    for r in patnet if r["config"]["shot"] == 1}  # fmt: skip
    assert len(set(fingerprints.values())) == 4  # each test set its own episodes
    header = (grid / "report" / "table_miou.md").read_text().splitlines()[0]
    order = ["deepglobe", "isic2018", "chest_xray", "fss1000"]
    expected = " | ".join(f"1-shot synthetic_{d}" for d in order) + " | 1-shot Mean"
    assert expected in header
