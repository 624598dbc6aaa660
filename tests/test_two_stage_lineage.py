"""BAM/HDMNet on the engine: base-class indices on episodes, a model per training shot, the base
learner handed over (init_from), base-learner files checked when a grid is expanded, recipes."""

from __future__ import annotations

import pytest
import torch

from fsbench.benchmarks.execution.tasks import build_model
from fsbench.benchmarks.grid import parse_grid
from fsbench.benchmarks.grid.recipes import RECIPES, TrainConfig
from fsbench.benchmarks.training.optim import make_optimizer
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader
from fsbench.datasets.manifests import EpisodeSpec
from fsbench.methods import METHODS

SMALL = {"blocks": [1, 1, 1, 1]}


def _grid(voc_root, methods, **extra):
    return {
        "name": "two_stage",
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "input_size": 33,
        "episodes": 2,
        "seeds": [1],
        "folds": [0],
        "shots": [1, 5],
        "methods": methods,
        "train": {"steps": 2},
        **extra,
    }


@pytest.mark.quick
def test_episodes_carry_the_base_class_order_their_labels_use(dataset):
    base = sorted(dataset.train_classes(0))
    loader = EpisodeLoader(dataset, 33, base_classes=base)
    image_id = sorted(dataset.class_images("trainaug", base[3]))[0]
    episode = loader.load(EpisodeSpec((base[3],), (), (image_id,)))
    assert episode.base_class_ids == base  # label i of query_base_labels is base[i - 1]
    assert (episode.query_base_labels[0] == 4).any()


@pytest.mark.quick
def test_a_model_per_training_shot_and_the_shot_reaches_the_builder(voc_root, tmp_path):
    released = tmp_path / "bam.pth"
    torch.save(METHODS.get("bam")(**SMALL).state_dict(), released)
    grid = parse_grid(
        _grid(voc_root, [{"name": "bam", "kwargs": SMALL, "checkpoint": str(released)}])
    )
    cells = grid.expand()
    assert len({c.model_key() for c in cells}) == 2  # released: still one model per shot
    five = next(c for c in cells if c.shot == 5)
    with pytest.raises(RuntimeError, match="kshot_rw"):  # a 5-shot BAM has the re-weighting
        build_model({**five.config(), "checkpoint": None}).load_state_dict(
            torch.load(released), strict=True
        )
    assert build_model({**five.config(), "checkpoint": None}).kshot_rw is not None
    one = next(c for c in cells if c.shot == 1)
    assert build_model({**one.config(), "checkpoint": None}).kshot_rw is None


@pytest.mark.quick
def test_another_folds_base_learner_file_is_one_line_at_expansion(voc_root, tmp_path):
    base = tmp_path / "initmodel" / "PSPNet" / "pascal" / "split2" / "resnet50" / "best.pth"
    base.parent.mkdir(parents=True)
    base.write_bytes(b"x")
    grid = parse_grid(
        _grid(voc_root, [{"name": "hdmnet", "kwargs": {**SMALL, "base_learner": str(base)}}])
    )
    with pytest.raises(FsbenchError, match=r"is fold 2's base learner .* this cell is fold 0"):
        grid.expand()
    missing = parse_grid(
        _grid(voc_root, [{"name": "bam", "kwargs": {"base_learner": str(tmp_path / "no.pth")}}])
    )
    with pytest.raises(FsbenchError, match="base-learner file not found"):
        missing.expand()


@pytest.mark.quick
def test_init_from_takes_over_the_pspnet_base_and_refuses_a_misfit():
    torch.manual_seed(0)
    base = METHODS.get("pspnet_base")(**SMALL)
    for name in ("bam", "hdmnet"):
        model = METHODS.get(name)(**SMALL)
        model.init_from(base)
        mine = model.learner_base[1][4] if name == "bam" else model.base_learnear[2]
        assert torch.equal(mine.weight, base.cls[4].weight)
        assert torch.equal(model.backbone[3][0].conv1.weight, base.backbone[3][0].conv1.weight)
    with pytest.raises(FsbenchError, match="61 classes .* built with 16"):
        METHODS.get("bam")(**SMALL).init_from(METHODS.get("pspnet_base")(classes=61, **SMALL))
    with pytest.raises(FsbenchError, match="starts from a pspnet_base entry"):
        METHODS.get("bam")(**SMALL).init_from(METHODS.get("hdmnet")(**SMALL))


@pytest.mark.quick
def test_the_recipes_are_the_official_optimisers():
    bam = METHODS.get("bam")(**SMALL, reduce_dim=16)
    cfg = TrainConfig.from_dict({**RECIPES["bam"], "steps": 10})
    assert cfg.exclude_novel_images and cfg.sampler == "official" and cfg.input_size == 473
    for parameter in bam.param_groups()["meta"]:
        parameter.requires_grad_(True)
    optimizer = make_optimizer(bam, cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["lr"] for g in optimizer.param_groups} == {0.05}  # index_split −1: every group ×10
    hdmnet = METHODS.get("hdmnet")(**SMALL)
    optimizer = make_optimizer(hdmnet, TrainConfig.from_dict({**RECIPES["hdmnet"], "steps": 10}))
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-3)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert hdmnet.kshot_rw is None and METHODS.get("hdmnet")(**SMALL, shot=5).kshot_rw is not None
    base = TrainConfig.from_dict({**RECIPES["pspnet_base"], "steps": 10})
    assert (base.sampler, base.images_per_step, base.augment) == ("images", 12, "pspnet")
