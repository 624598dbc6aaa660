import shutil

import numpy as np
import pytest
from PIL import Image

from fsbench.datasets.pascal import DatasetError, Pascal5i
from fsbench.datasets.synthetic import voc_palette, write_voc


def test_loader_reads_real_layout(dataset, voc_root):
    voc = voc_root / "VOCdevkit" / "VOC2012"
    assert dataset.root == voc.resolve()
    ids = dataset.list_ids("trainaug")
    assert ids == sorted(ids) and not set(ids) & set(dataset.list_ids("val"))
    assert set(dataset.list_ids("train")) <= set(ids)
    image, label = dataset.load_image(ids[0]), dataset.load_label(ids[0])
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[:2] == label.shape
    assert Image.open(voc / "SegmentationClassAug" / f"{ids[0]}.png").mode == "P"
    assert 255 in np.unique(label)  # object outlines are void, as in VOC


def test_class_index_matches_masks(dataset):
    for class_id in (1, 7, 20):
        listed = dataset.class_images("trainaug", class_id)
        assert listed == sorted(listed) and listed
        truth = [
            i for i in dataset.list_ids("trainaug") if (dataset.load_label(i) == class_id).any()
        ]
        assert listed == truth


def test_folds_follow_shaban_definition(dataset):
    assert dataset.fold_classes(0) == [1, 2, 3, 4, 5]
    assert dataset.fold_classes(3) == [16, 17, 18, 19, 20]
    assert dataset.train_classes(1) == [c for c in range(1, 21) if c not in range(6, 11)]
    with pytest.raises(DatasetError, match="fold 4 is outside 0…3"):
        dataset.check_fold(4)


@pytest.fixture
def broken_root(tmp_path):
    write_voc(tmp_path, 24, 48, seed=3)
    return tmp_path, tmp_path / "VOCdevkit" / "VOC2012"


def _first_id(voc):
    return (voc / "ImageSets" / "Segmentation" / "trainaug.txt").read_text().split()[0]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Pascal5i(tmp_path / "nowhere")


def test_missing_subfolder(broken_root):
    root, voc = broken_root
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(DatasetError, match="SegmentationClassAug: missing subfolder"):
        Pascal5i(root)


@pytest.mark.parametrize("which", ["JPEGImages", "SegmentationClassAug"])
def test_listed_id_without_file(broken_root, tmp_path, which):
    root, voc = broken_root
    image_id = _first_id(voc)
    suffix = ".jpg" if which == "JPEGImages" else ".png"
    (voc / which / f"{image_id}{suffix}").unlink()
    with pytest.raises(DatasetError, match=f"{image_id}{suffix}: listed in"):
        Pascal5i(root, cache_dir=tmp_path / "idx").class_index("trainaug")


def test_truncated_image(broken_root, tmp_path):
    root, voc = broken_root
    image_id = _first_id(voc)
    path = voc / "JPEGImages" / f"{image_id}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="unreadable or truncated image"):
        Pascal5i(root, cache_dir=tmp_path / "idx").load_image(image_id)


def test_mask_label_out_of_range(broken_root, tmp_path):
    root, voc = broken_root
    image_id = _first_id(voc)
    bad = Image.fromarray(np.full((36, 48), 42, np.uint8), mode="P")
    bad.putpalette(voc_palette())
    bad.save(voc / "SegmentationClassAug" / f"{image_id}.png")
    with pytest.raises(DatasetError, match=r"labels \[42\] outside 0…20 and 255"):
        Pascal5i(root, cache_dir=tmp_path / "idx").class_index("trainaug")


def test_cli_bad_input_is_one_line_and_status_2(cli_process, broken_root, tmp_path):
    root, voc = broken_root
    out = tmp_path / "m.json"
    missing = cli_process(
        ["manifest", "--data-root", tmp_path / "nope", "--fold", "0", "--output", out]
    )
    bad_fold = cli_process(["manifest", "--data-root", root, "--fold", "7", "--output", out])
    for result, text in ((missing, "does not exist"), (bad_fold, "fold 7 is outside 0…3")):
        assert result.returncode == 2, result.stderr
        assert text in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
