"""Training recipes as grid values: cell identity, augmentations, episodes per step, the poly
schedule and BatchNorm modes."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsbench.benchmarks.grid import load_grid
from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.optim import make_optimizer, make_scheduler, train_mode
from fsbench.benchmarks.training.plan import EpisodeStream, episode_plan
from fsbench.core import FsbenchError, seeded_rng
from fsbench.datasets.augment import AUGMENTATIONS, PAD, Augmentation, PfenetAugmentation
from fsbench.datasets.episodes import EpisodeLoader
from fsbench.datasets.protocols import get_protocol
from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod

PANET = get_protocol("panet")
RECORDED_IDS = json.loads((Path(__file__).parent / "fixtures" / "cell_ids.json").read_text())


def test_every_bundled_grid_keeps_the_cell_ids_of_finished_results():
    # recorded with the code before the recipes of this file existed: new settings at their
    # defaults must not move a single id (the finished results are found by them). A key may
    # carry overrides ("quickstart.yaml input_size=128": the default's size when recorded; a
    # `methods=` list: the grid's methods when recorded, before HSNet and PFENet joined it)
    for key, ids in RECORDED_IDS.items():
        path, *overrides = key.split()
        name, _, smoke = path.partition(":")
        grid = load_grid(name, overrides, smoke=bool(smoke))
        assert sorted(c.id for c in grid.expand()) == ids, key


def test_every_train_setting_declares_how_it_joins_a_cell_id():
    for item in dataclasses.fields(TrainConfig):
        assert item.metadata.get("identity") in ("always", "when_set"), item.name

    @dataclasses.dataclass(frozen=True)
    class Undeclared(TrainConfig):
        warmup: int = 0  # a new setting written without later(…)

    with pytest.raises(FsbenchError, match="warmup: declare it"):
        Undeclared()
    later = TrainConfig(episodes_per_step=4, lr_schedule="poly", augment="pfenet").to_dict()
    assert later["episodes_per_step"] == 4 and later["augment"] == "pfenet"
    assert "poly_power" not in later and "batchnorm" not in later


def test_flip_and_none_are_the_flip_setting():
    assert TrainConfig(augment="flip") == TrainConfig()
    assert TrainConfig(augment="none") == TrainConfig(flip=False)
    assert TrainConfig(augment="none").to_dict() == TrainConfig(flip=False).to_dict()
    with pytest.raises(FsbenchError, match="augment='mixup'"):
        TrainConfig(augment="mixup")


def _plan(dataset, **settings):
    cfg = TrainConfig(steps=3, **settings)
    plan = episode_plan(dataset, PANET, "trainaug", 0, dataset.train_classes(0), 1, 2, cfg)
    return cfg, plan


@pytest.mark.parametrize("augment", ["flip", "none", "pfenet"])
def test_training_episodes_come_at_the_input_size(dataset, augment):
    cfg, plan = _plan(dataset, augment=augment, episodes_per_step=2)
    loader = EpisodeLoader(dataset, 40)
    stream = EpisodeStream(loader, plan, AUGMENTATIONS.build(cfg.augmentation))
    episodes = stream[0]
    assert len(plan) == 3 and len(episodes) == 2
    for episode in episodes:
        assert episode.support_images.shape[-2:] == (40, 40)
        assert episode.support_fg.shape[-2:] == episode.query_labels.shape[-2:] == (40, 40)
    again = EpisodeStream(loader, plan, AUGMENTATIONS.build(cfg.augmentation))[0]
    assert torch.equal(episodes[1].query_images, again[1].query_images)  # params are data


def test_pfenet_augmentation_scales_rotates_and_crops_with_void_padding():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    label = np.zeros((30, 50), np.uint8)
    label[5:20, 10:30] = 1
    augmentation = PfenetAugmentation()
    params = (1.1, True, 10.0, True, True, (0.5, 0.5))
    out_pixels, out_label = augmentation.raw(pixels, label, params, 48)
    assert out_pixels.shape == (48, 48, 3) and out_label.shape == (48, 48)
    assert (out_label == PAD).any() and (out_label == 1).any()  # padded, object kept
    assert set(np.unique(out_label)) <= {0, 1, PAD}  # nearest: no blended labels
    plain = (1.0, False, 0.0, False, False, (0.0, 0.0))
    same_pixels, same_label = augmentation.raw(pixels, label, plain, 20)
    assert np.array_equal(same_label, label[:20, :20])  # no transform, top-left crop (no redraw)
    assert np.array_equal(same_pixels, pixels[:20, :20])
    draws = [augmentation.draw(seeded_rng("x", 1)) for _ in range(2)]
    assert draws[0] == draws[1] and 0.9 <= draws[0][0] <= 1.1 and -10 <= draws[0][2] <= 10


def test_a_plugin_augmentation_is_a_recipe_name(dataset):
    @AUGMENTATIONS.register("test_invert")
    class Invert(Augmentation):
        def draw(self, rng):
            return True

        def tensors(self, tensors, params):
            return (-tensors[0], *tensors[1:])

    cfg, plan = _plan(dataset, augment="test_invert")
    loader = EpisodeLoader(dataset, 32)
    inverted = EpisodeStream(loader, plan, AUGMENTATIONS.build(cfg.augmentation))[0][0]
    plain = loader.load(plan[0][0][0])
    assert torch.equal(inverted.query_images, -plain.query_images)


def test_accumulated_episodes_give_the_mean_losses_gradient(dataset):
    from fsbench.benchmarks.training.optim import step_losses

    cfg, plan = _plan(dataset, episodes_per_step=3, augment="none")
    episodes = EpisodeStream(EpisodeLoader(dataset, 32), plan, AUGMENTATIONS.build("none"))[0]
    torch.manual_seed(0)
    model = METHODS.get("test_panet")()
    losses = step_losses(model, episodes, torch.autocast("cpu", enabled=False))
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    mean = sum(model.loss(e)["total"] for e in episodes) / 3
    mean.backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert losses["total"] == pytest.approx(float(mean.detach()), rel=1e-5)


class WithBatchNorm(FewShotMethod):
    """A backbone group and a head group, each with a BatchNorm layer."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))

    def param_groups(self):
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def loss(self, episode):
        logits = self.head(self.backbone(episode.query_images))
        return {"total": logits.mean()}


def test_batchnorm_modes_per_group_and_no_silent_accumulation_over_training_statistics(dataset):
    from fsbench.benchmarks.training.optim import step_losses

    model = WithBatchNorm()
    train_mode(model, TrainConfig(batchnorm=(("backbone", "eval"),)))
    assert not model.backbone[1].training and model.head[1].training
    train_mode(model, TrainConfig(batchnorm=(("all", "eval"),)))
    assert not model.head[1].training
    with pytest.raises(FsbenchError, match="no parameter group \\['neck'\\]"):
        train_mode(model, TrainConfig(batchnorm=(("neck", "eval"),)))
    train_mode(model, TrainConfig())
    cfg, plan = _plan(dataset, episodes_per_step=2, augment="none")
    episodes = EpisodeStream(EpisodeLoader(dataset, 32), plan, AUGMENTATIONS.build("none"))[0]
    with pytest.raises(FsbenchError, match="trains BatchNorm"):
        step_losses(model, episodes, torch.autocast("cpu", enabled=False))


def test_poly_schedule_as_pfenet():
    cfg = TrainConfig(steps=10, lr=0.01, lr_schedule="poly")
    optimizer = make_optimizer(METHODS.get("test_panet")(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.01 * (1 - s / 10) ** 0.9 for s in range(1, 11)])
