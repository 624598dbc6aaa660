import pytest
import yaml

from fsbench.benchmarks.grid.files import apply_overrides, load_grid, parse_grid
from fsbench.core import FsbenchError


def test_expand_and_stable_ids(small_grid_dict):
    grid = parse_grid(small_grid_dict)
    cells = grid.expand()
    assert len(cells) == 3  # 3 methods × 1 fold × 1 shot
    assert [c.id for c in cells] == [c.id for c in parse_grid(small_grid_dict).expand()]
    trained, untrained = cells[0], cells[1]
    assert trained.train is not None and untrained.train is None
    changed = parse_grid(apply_overrides(small_grid_dict, ["train.steps=5"])).expand()
    assert changed[0].id != trained.id  # the trained cell depends on the schedule …
    assert changed[1].id == untrained.id  # … an untrained one does not


def test_sweeps_labels_and_model_sharing(small_grid_dict):
    raw = dict(
        small_grid_dict,
        shots=[1, 2],
        methods=[{"name": "test_panet", "sweep": {"alpha": [10, 20]}}, "test_prototype_notrain"],
    )
    cells = parse_grid(raw).expand()
    assert [c.method.row() for c in cells][:4:2] == ["test_panet[alpha=10]", "test_panet[alpha=20]"]
    notrain = [c for c in cells if c.method.name == "test_prototype_notrain"]
    assert len({c.model_key() for c in notrain}) == 1  # one untrained model serves both shots


def test_include_and_command_line_overrides(tmp_path, small_grid_dict):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(small_grid_dict))
    (tmp_path / "child.yaml").write_text("include: base.yaml\nname: child\ntrain: {steps: 9}\n")
    grid = load_grid(tmp_path / "child.yaml", ["shots=[1, 2]", "seeds=[5]"])
    assert grid.name == "child" and grid.train.steps == 9 and grid.train.lr_milestones == (3,)
    assert grid.shots == (1, 2) and grid.seeds == (5,)


@pytest.mark.parametrize(
    "override,message",
    [
        ("shots=[0]", "shots: 0 is impossible"),
        ("folds=[7]", "folds: 7 is impossible"),
        ("methods=[panettt]", "unknown method 'panettt'; did you mean panet"),
        ("epochs=3", "unknown grid key"),
        ("train.stepz=3", "train: unknown key"),
        ("protocol=foo", "protocol: unknown 'foo'"),
        ("dataset.name=voc", "unknown dataset 'voc'"),
        ("methods=[test_panet, test_panet]", "listed twice"),
    ],
)
def test_bad_grid_values_are_one_clear_error(small_grid_dict, override, message):
    with pytest.raises(FsbenchError, match=message):
        parse_grid(apply_overrides(small_grid_dict, [override])).expand()


def test_method_recipe_overrides_grid_training(small_grid_dict):
    raw = dict(
        small_grid_dict,
        methods=[
            {"name": "test_panet"},
            {"name": "test_sgone", "train": {"lr": 1e-5, "lr_milestones": [2]}},
        ],
    )
    panet, sgone = parse_grid(raw).expand()
    assert panet.train.lr == 1e-3 and sgone.train.lr == 1e-5 and sgone.train.lr_milestones == (2,)
    assert sgone.train.steps == panet.train.steps == 4
    # One method under two training seeds: two rows (the training-seed spread), two models.
    seed1 = {"name": "test_panet", "train": {"seed": 1}, "label": "s1"}
    twice = parse_grid(dict(raw, methods=["test_panet", seed1]))
    first, second = twice.expand()
    assert (first.train.seed, second.train.seed) == (0, 1) and first.id != second.id
    with pytest.raises(FsbenchError, match="test_sgone: train: unknown key"):
        parse_grid(dict(raw, methods=[{"name": "test_sgone", "train": {"epochs": 3}}]))


def test_bundled_quickstart_parses():
    grid = load_grid("quickstart.yaml")
    cells = grid.expand()
    assert len(cells) == 5 * 4 * 2 and {c.shot for c in cells} == {1, 5}


@pytest.mark.parametrize("grid", ["panet_pascal.yaml", "panet_coco.yaml"])
def test_smoke_dataset_does_not_inherit_the_real_data_root(grid):
    # The real grid's `data_root: data/VOC` once leaked into the smoke run's generated dataset,
    # which then wrote its images into ./data/VOC of whatever folder the command ran in.
    real, smoke = load_grid(grid), load_grid(grid, smoke=True)
    assert real.dataset["data_root"].startswith("data/")
    assert smoke.dataset["name"].startswith("synthetic_") and "data_root" not in smoke.dataset


def test_included_dataset_keys_merge_when_the_dataset_is_the_same(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "dataset: {name: synthetic_pascal5i, n_images: 40, image_size: 32}\n"
        "methods: [all_background]\n"
    )
    (tmp_path / "top.yaml").write_text("include: base.yaml\ndataset: {image_size: 48}\n")
    assert load_grid(tmp_path / "top.yaml").dataset == {
        "name": "synthetic_pascal5i",
        "n_images": 40,
        "image_size": 48,
    }


def test_train_seeds_axis_and_declared_comparisons(small_grid_dict):
    from fsbench.benchmarks.grid.files import parse_grid

    grid = parse_grid(
        dict(
            small_grid_dict,
            train_seeds=[0, 1, 2],
            compare=[["test_panet", "test_prototype_notrain"]],
        )
    )
    cells = grid.expand()
    trained = [c for c in cells if c.train is not None]
    assert sorted(c.train.seed for c in trained) == [0, 1, 2]  # one model per training seed
    assert len({c.id for c in trained}) == 3 and all("train seed" in c.title for c in trained)
    assert len([c for c in cells if c.train is None]) == 2  # untrained rows: once each
    assert grid.compare == (("test_panet", "test_prototype_notrain"),)
    with pytest.raises(FsbenchError, match="not rows of the grid"):
        parse_grid(dict(small_grid_dict, compare=[["panet", "nothing"]]))
