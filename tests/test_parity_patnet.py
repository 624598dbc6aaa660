"""PATNet equals its official code (slei109/PATNet `PATNetwork`), run side by side with random
weights: tests/fixtures/official_parity_patnet.json was recorded by
tests/fixtures/record_official_patnet_parity.py from a checkout of the official repository.
Checked at 257 px, ResNet-50: each support's 1-shot logits, the 5-shot vote, one step of its
train.py (Adam 1e-3, backbone in eval, float64): the loss and every updated weight."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import seeded_state_dict
from test_parity_hsnet_pfenet import (
    SIZE,
    assert_close,
    assert_weights,
    episode,
    train_one_step,
    training_episodes,
)

from fsbench.benchmarks.grid.recipes import RECIPES
from fsbench.core import FsbenchError
from fsbench.methods import METHODS

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "official_parity_patnet.json").read_text()
)
RECORD = FIXTURE["patnet"]["resnet50"]


def official(**kwargs):
    model = METHODS.get("patnet")(backbone="resnet50", **kwargs)
    entries = [(k, tuple(shape), dtype) for k, shape, dtype in RECORD["state_dict"]]
    model.load_official_state_dict(seeded_state_dict(entries, FIXTURE["weight_seed"], 1.0))
    return model


@pytest.mark.slow
def test_patnet_logits_and_vote_equal_the_official_forward():
    assert FIXTURE["size"] == SIZE
    model = official().eval()
    five = episode(5)
    with torch.no_grad():
        logits = model.logits(five)
        labels = model(five)
    assert_close(logits[:, 0], RECORD["logits"])
    vote = RECORD["vote_5shot"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(vote["bits_base64"]), np.uint8))
    expected = torch.from_numpy(bits[: SIZE * SIZE].reshape(vote["shape"]).astype(np.int64))
    assert torch.equal(labels[0], expected)
    hsnet = METHODS.get("hsnet")(backbone="resnet50").eval()  # the transformation matters
    hsnet.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(hsnet.logits(five)[:, 0], logits[:, 0], atol=1e-3)


@pytest.mark.slow
def test_patnet_training_step_equals_the_official_step():
    model = official().double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = train_one_step(model, RECIPES["patnet"], training_episodes(2, ignore_strip=False))
    expected = RECORD["train_step"]
    assert expected["dtype"] == "float64"
    assert step["total"] == pytest.approx(expected["loss"], rel=1e-4)
    assert_weights(model, before, expected["weights"])
    moved = {k for k, (_, delta) in expected["weights"].items() if delta > 0}
    assert {"reference_layer1.weight", "reference_layer3.weight"} <= moved  # the anchors learn


@pytest.mark.quick
def test_patnet_state_dicts_and_finetuning_settings_are_checked():
    model = METHODS.get("patnet")(backbone="resnet50", blocks=[1, 1, 1, 1])
    assert model.anchor_of == [0, 1, 2]  # one feature per stage 2–4: its stage's anchor
    assert METHODS.get("patnet")(backbone="vgg16").anchor_of == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(FsbenchError, match="not an official PATNet state dict"):
        model.load_official_state_dict({"hpn_learner.x": torch.zeros(1)})
    with pytest.raises(FsbenchError, match="finetune_steps"):
        METHODS.get("patnet")(finetune_steps=-1)


@pytest.mark.quick
def test_task_adaptive_finetuning_moves_only_the_anchors_and_restores_them():
    torch.manual_seed(0)
    model = METHODS.get("patnet")(backbone="resnet50", blocks=[1, 1, 1, 1], finetune_steps=3,
                                  finetune_lr=1e-2).eval()  # fmt: skip
    from fsbench.datasets.episodes import Episode

    images = torch.randn(1, 2, 3, 64, 64)
    fg = torch.zeros(1, 2, 64, 64)
    fg[:, :, 10:40, 12:44] = 1
    query = torch.randn(1, 3, 64, 64)
    batch = Episode([1], images, fg, 1 - fg, query, torch.zeros(1, 64, 64, dtype=torch.long))
    anchors = [a.weight.detach().clone() for a in model.anchors()]
    learner = [p.detach().clone() for p in model.hpn_learner.parameters()]
    support, _ = model.encode_episode(batch)
    losses = model.finetune(support, batch.support_fg)
    assert len(losses) == 3 and losses[-1] < losses[0]  # it fits the supports
    assert any(not torch.equal(a, b.weight) for a, b in zip(anchors, model.anchors()))
    for anchor, layer in zip(anchors, model.anchors()):
        layer.weight.data.copy_(anchor)
    with torch.no_grad():
        model(batch)  # predict: fine-tune, predict, restore
    assert all(torch.equal(a, b.weight) for a, b in zip(anchors, model.anchors()))
    assert all(torch.equal(a, b) for a, b in zip(learner, model.hpn_learner.parameters()))
