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
    from fsbench.benchmarks.cli.main import main

    assert main(["list", "--dataset", "fss1000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("fold 0: 761 ") and out[0].count(",") == 239


def test_a_dataset_class_owns_its_protocol_switches(tmp_path):
    """How a protocol applies to a dataset is the dataset class's, read without opening data;
    a plugin dataset that declares nothing keeps the preset and uses fsbench's sampler."""
    from fsbench.core import FsbenchError
    from fsbench.datasets.base import FewShotDataset
    from fsbench.datasets.protocols import check_sampler, get_protocol, resolve
    from fsbench.datasets.registry import DATASETS

    assert resolve("hsnet", "synthetic_fss1000").episodes == 2400
    assert resolve("panet", "fss1000").episodes == 1000
    assert resolve("pfenet", "coco20i").input_size == 641
    assert resolve("pfenet", "coco20i").episodes == 20001
    assert resolve("pfenet", "pascal5i").input_size == 473
    panet = get_protocol("panet")
    assert check_sampler(None, panet, "fss1000") == "fsbench"
    assert check_sampler(None, get_protocol("hsnet"), "fss1000") == "official"
    with pytest.raises(FsbenchError, match="no official test script to replay on fss1000"):
        check_sampler("official", panet, "fss1000")

    class Plain(FewShotDataset):  # abstract methods: never opened here
        name = "plain"

    @DATASETS.register("plain_plugin")
    def plain_plugin(data_root=None, **kwargs) -> Plain:
        raise AssertionError("not opened")

    try:
        assert resolve("pfenet", "plain_plugin") == get_protocol("pfenet")
        assert check_sampler(None, panet, "plain_plugin") == "fsbench"
    finally:
        DATASETS._builders.pop("plain_plugin")
