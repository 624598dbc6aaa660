"""PSPNet (base learner), BAM and HDMNet equal their official code, through the API a user has:
`METHODS.get(...)(...)`, `load_official_state_dict(official_model.state_dict())`, the model
called on an `Episode`, and one training step by fsbench's engine under the named recipe.

tests/fixtures/official_parity_bam_hdmnet.json was recorded by
tests/fixtures/record_official_bam_hdmnet.py from chunbolang/BAM and Pbihao/HDMNet (with mmcv
1.7.2 and mmsegmentation 0.30.0 for HDMNet's transformer), run from checkouts outside this
repository with the same deterministic weights, at 257 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import parity_episode, seeded_state_dict
from test_parity_hsnet_pfenet import assert_close, assert_weights, train_one_step

from fsbench.benchmarks.grid.recipes import RECIPES
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode, ImageBatch
from fsbench.methods import METHODS

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "official_parity_bam_hdmnet.json").read_text()
)
SIZE = FIXTURE["size"]
BASE_CLASSES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # fold 3's training classes


def renamed(weights: dict) -> dict:
    """Official parameter names → fsbench's (layerN → backbone.N; the rest are the same)."""
    out = {}
    for name, value in weights.items():
        head, _, rest = name.partition(".")
        if head.startswith("layer") and head[5:].isdigit():
            name = f"backbone.{head[5:]}.{rest}"
        out[name] = value
    return out


def seeded(entries):
    return seeded_state_dict([(k, tuple(s), d) for k, s, d in entries], FIXTURE["weight_seed"])


def built(name: str, entries, **kwargs):
    model = METHODS.get(name)(layers=50, **kwargs)
    model.load_official_state_dict(seeded(entries))
    return model


def episode(shots: int) -> Episode:
    query, supports, masks = parity_episode(SIZE, shots)
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    return Episode([1], supports[None], masks[None], 1 - masks[None], query, labels)


def training_episodes() -> list[Episode]:
    """The recorder's `training_batch()` as two fsbench episodes with base-class labels."""
    query, supports, masks = (t.double() for t in parity_episode(SIZE, 1))
    out = []
    for i, class_id in enumerate((BASE_CLASSES[2], BASE_CLASSES[10])):
        label = masks[0].roll(5 * i + 7, -2).long()
        label[:, :4] = 255
        base = torch.zeros_like(label)
        base[label == 1] = BASE_CLASSES.index(class_id) + 1
        base[40:60, 70:120] = 7
        base[label == 255] = 255
        mask = masks.roll(3 * i, -1)
        out.append(
            Episode(
                [class_id],
                supports.roll(i, -2)[None],
                mask[None],
                1 - mask[None],
                query.roll(i, -1),
                label[None],
                query_base_labels=base[None],
                base_class_ids=list(BASE_CLASSES),
            )  # fmt: skip
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bam", "hdmnet"])
@pytest.mark.parametrize("shots", [1, 5])
def test_outputs_equal_the_official_forward(name, shots):
    run = next(r for r in FIXTURE[name]["runs"] if r["shots"] == shots)
    model = built(name, run["state_dict"], shot=shots).eval()
    query, supports, masks = parity_episode(SIZE, shots)
    with torch.no_grad():
        final, meta, base = model.outputs(query, supports[None], masks[None])
        logits = model(episode(shots))
    assert_close(final, run["final"])
    assert_close(meta, run["meta"])
    assert_close(base, run["base"], FIXTURE["base_stride"])
    assert torch.equal(logits, final)  # the episode API gives final_out at the label size


@pytest.mark.slow
def test_pspnet_base_logits_and_training_step_equal_the_official():
    record = FIXTURE["pspnet"]
    model = built("pspnet_base", record["state_dict"]).eval()
    query, _, _ = parity_episode(SIZE, 1)
    with torch.no_grad():
        assert_close(model.logits(query), record["logits"], FIXTURE["base_stride"])
    model = model.double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = ImageBatch(
        torch.cat([query.double().roll(i, -1) for i in range(2)]),
        torch.stack([e.query_base_labels[0] for e in training_episodes()]),
    )
    from fsbench.benchmarks.grid.recipes import TrainConfig
    from fsbench.benchmarks.training.optim import make_optimizer, make_scheduler, train_mode

    cfg = TrainConfig.from_dict({**RECIPES["pspnet_base"], "steps": FIXTURE["max_iter"]})
    optimizer = make_optimizer(model, cfg)
    make_scheduler(optimizer, cfg)
    train_mode(model, cfg)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout2d):
            module.eval()
    loss = model.loss_images(batch)["total"]
    optimizer.zero_grad()
    loss.backward()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    optimizer.step()
    expected = record["train_step"]
    assert lrs == pytest.approx(sorted(set(expected["lr"])), rel=1e-9)  # encoder lr, ppm/cls 10·lr
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-4)
    assert_weights(model, before, renamed(expected["weights"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bam", "hdmnet"])
def test_training_step_equals_the_official_step(name):
    record = FIXTURE[name]
    model = built(name, record["runs"][0]["state_dict"]).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    stage = dict(model.default_stages()[0])
    for parameter in model.parameters():  # the stage's groups train, the rest is frozen
        parameter.requires_grad_(False)
    for group in stage["params"]:
        for parameter in model.param_groups()[group]:
            parameter.requires_grad_(True)
    recipe = {**RECIPES[name], "episodes_per_step": 2}
    step = train_one_step(model, recipe, training_episodes())
    expected = record["train_step"]
    # the first group's lr as poly_learning_rate sets it at iteration 1 (BAM: the meta
    # learner at 10·lr; HDMNet: the transformer at lr)
    assert step["lr"] == pytest.approx(expected["lr"][0], rel=1e-9)
    assert step["total"] == pytest.approx(expected["loss"], rel=1e-4)
    terms = [step["main"] + step["meta"], step["distil"], step["base"]] if name == "hdmnet" else [
        step["main"], step["meta"], step["base"]]  # fmt: skip
    assert terms == pytest.approx(expected["terms"], rel=1e-4)
    assert_weights(model, before, renamed(expected["weights"]))


@pytest.mark.slow  # builds full-size ResNet-50 models
def test_released_layouts_and_base_learner_files_load_and_misfits_are_one_line(tmp_path):
    from fsbench.methods.weights import read_state_dict

    run = FIXTURE["bam"]["runs"][0]
    state = seeded(run["state_dict"])
    path = tmp_path / "train_epoch_107_0.6897.pth"  # BAM's released layout, saved under DDP
    torch.save({"epoch": 107, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {}}, path)  # fmt: skip
    model = METHODS.get("bam")(layers=50)
    model.load_official_state_dict(read_state_dict(path, "BAM checkpoint", "fix"))
    assert torch.equal(model.cls_meta[3].weight, state["cls_meta.3.weight"])
    # a separate base-learner file (BAM's initmodel/PSPNet/pascal/split0/resnet50/best.pth)
    psp = seeded(FIXTURE["pspnet"]["state_dict"])
    for key in [k for k in psp if k.startswith("encoder.")]:  # one module under two names
        head, index, rest = key.split(".", 2)
        psp[key] = psp[f"layer{index}.{rest}"]
    base = tmp_path / "PSPNet" / "pascal" / "split0" / "resnet50" / "best.pth"
    base.parent.mkdir(parents=True)
    torch.save({"state_dict": psp}, base)
    for name in ("bam", "hdmnet"):
        model = METHODS.get(name)(layers=50, base_learner=str(base))
        final_conv = model.learner_base[1][4] if name == "bam" else model.base_learnear[2]
        assert torch.equal(final_conv.weight, psp["cls.4.weight"])
        assert torch.equal(model.backbone[4][0].conv1.weight, psp["layer4.0.conv1.weight"])
    coco = {
        k: (torch.zeros(61, *v.shape[1:]) if k.startswith("cls.4.") else v) for k, v in psp.items()
    }
    wrong = tmp_path / "coco_best.pth"
    torch.save({"state_dict": coco}, wrong)
    with pytest.raises(
        FsbenchError,
        match=r"61 classes \(60 base classes \+ background, ResNet-50\); BAM expects 16",
    ):
        METHODS.get("bam")(layers=50, base_learner=str(wrong))
    with pytest.raises(FsbenchError, match="a ResNet-50 base learner; BAM is built with VGG-16-BN"):
        METHODS.get("bam")(vgg=True, base_learner=str(base))
    with pytest.raises(FsbenchError, match="base-learner file not found"):
        METHODS.get("hdmnet")(layers=50, base_learner=str(tmp_path / "nope.pth"))
    from fsbench.methods.bam import BAM

    assert "is fold 0's base learner" in BAM.kwargs_problem({"base_learner": str(base)}, 2)
    assert BAM.kwargs_problem({"base_learner": str(base)}, 0) is None
