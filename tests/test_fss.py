"""FSS-1000 in its real layout (<class>/<n>.jpg + binary <n>.png), with HSNet's class splits."""

import numpy as np
import pytest
from PIL import Image

from fsbench.datasets.fss import Fss1000, split_classes, write_fss
from fsbench.datasets.pascal import DatasetError


@pytest.fixture(scope="module")
def fss(tmp_path_factory):
    root = tmp_path_factory.mktemp("fss")
    write_fss(root, 60, 48, 0)  # 6 classes: 4 of HSNet's train split, 2 of its test split
    return Fss1000(root)


def test_classes_and_folds_follow_hsnet(fss):
    splits = split_classes()
    assert [len(splits[s]) for s in ("trn", "val", "test")] == [520, 240, 240]
    assert fss.fold_classes(0) == [761, 762] and fss.train_classes(0) == [1, 2, 3, 4]
    assert fss.class_names[760] == splits["test"][0]
    with pytest.raises(DatasetError, match="one fold"):
        fss.fold_classes(1)


def test_images_masks_and_hsnet_file_order(fss):
    ids = fss.class_images("test", 761)
    name = split_classes()["test"][0]
    assert ids[:3] == [f"{name}/1", f"{name}/10", f"{name}/2"]  # sorted paths, as HSNet
    masks, void = fss.load_masks(ids[0], [761, 762])
    assert masks[0].any() and not masks[1].any() and not void.any()
    assert fss.load_image(ids[0]).shape == (48, 48, 3)
    big = int(masks[0].sum()) + 1
    assert ids[0] not in fss.class_images("test", 761, big)
    assert fss.class_images("trn", 761) == []


def test_bad_layouts_are_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Fss1000(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folder of FSS-1000"):
        Fss1000(tmp_path / "empty")
    root = tmp_path / "broken"
    write_fss(root, 20, 32, 0)
    dataset = Fss1000(root)
    image_id = dataset.class_images("trn", 1)[0]
    dataset.mask_path(image_id).unlink()
    with pytest.raises(DatasetError, match="mask file is missing"):
        dataset.load_masks(image_id, [1])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(dataset.mask_path(image_id))
    assert not dataset.load_masks(image_id, [1])[0].any()


def test_list_names_hsnet_test_classes_without_data(capsys):
    from fsbench.benchmarks.cli import main

    assert main(["list", "--dataset", "fss1000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("fold 0: 761 ") and out[0].count(",") == 239
