"""HSNet and PFENet equal their official code, through the API a user has:
`METHODS.get(...)(...)`, `load_official_state_dict(official_model.state_dict())`, the model
called on an `Episode`, and one training step by fsbench's engine under the named recipe.

tests/fixtures/official_parity_hsnet_pfenet.json was recorded by
tests/fixtures/record_official_hsnet_pfenet.py from juhongm999/hsnet and dvlab-research/PFENet
(run from checkouts outside this repository) with the same deterministic weights
(tests/helpers.py `seeded_state_dict` over their own state-dict names), at 257 px.
"""

from __future__ import annotations

import base64
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import parity_episode, seeded_state_dict

from fsbench.benchmarks.grid.recipes import RECIPES, TrainConfig
from fsbench.benchmarks.training.optim import (
    make_optimizer,
    make_scheduler,
    step_losses,
    train_mode,
)
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods import METHODS

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "official_parity_hsnet_pfenet.json").read_text()
)
SIZE, STRIDE = FIXTURE["size"], FIXTURE["stride"]
TOLERANCE = 1e-4  # relative to the largest official value


def unpack(packed) -> torch.Tensor:
    data = np.frombuffer(base64.b64decode(packed["float32_base64"]), dtype=np.float32)
    return torch.from_numpy(data.copy()).view(packed["shape"])


def official(name: str, record: dict, **kwargs):
    model = METHODS.get(name)(**kwargs)
    entries = [(k, tuple(shape), dtype) for k, shape, dtype in record["state_dict"]]
    state = seeded_state_dict(entries, FIXTURE["weight_seed"], FIXTURE["weight_gain"][name])
    model.load_official_state_dict(state)
    return model


def episode(shots: int, labels=None) -> Episode:
    query, supports, masks = parity_episode(SIZE, shots)
    if labels is None:
        labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    return Episode([1], supports[None], masks[None], 1 - masks[None], query, labels)


def training_episodes(count: int, ignore_strip: bool) -> list[Episode]:
    """The recorder's `batch()`: the parity episode rolled per episode, in float64."""
    query, supports, masks = (t.double() for t in parity_episode(SIZE, 1))
    out = []
    for i in range(count):
        label = masks[0].roll(5 * i + 7, -2).long()
        if ignore_strip:
            label[:, :4] = 255
        out.append(
            Episode(
                [1],
                supports.roll(i, -2)[None],
                masks.roll(3 * i, -1)[None],
                1 - masks.roll(3 * i, -1)[None],
                query.roll(i, -1),
                label[None],
            )
        )
    return out


def assert_close(mine: torch.Tensor, summary: dict, stride: int = STRIDE) -> None:
    assert list(mine.shape) == summary["shape"]
    scale = summary["max_abs"]
    sample = unpack(summary["sample"])
    assert (mine[..., ::stride, ::stride] - sample).abs().max().item() <= TOLERANCE * scale
    assert abs(mine.double().sum().item() - summary["sum"]) <= TOLERANCE * summary["abs_sum"]
    assert mine.double().abs().sum().item() == pytest.approx(summary["abs_sum"], rel=TOLERANCE)
    assert scale > 0.1  # not a degenerate output


def train_one_step(model, recipe: dict, episodes) -> dict:
    cfg = TrainConfig.from_dict({**recipe, "steps": 1000, "episodes_per_step": len(episodes)})
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    train_mode(model, cfg)
    for module in model.modules():  # dropout off on both sides (random draws cannot match)
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.eval()
    optimizer.zero_grad()
    losses = step_losses(model, episodes, nullcontext())
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {**losses, "lr": lr}


def assert_weights(model, before: dict, expected: dict) -> None:
    params = dict(model.named_parameters())
    assert expected, "the fixture records updated weights"
    assert sum(moved > 0 for _, moved in expected.values()) > 10
    for name, (total, moved) in expected.items():
        value = params[name].detach().double()
        delta = (value - before[name].double()).abs().sum().item()
        if moved == 0:  # the official frozen backbone (no gradient reaches it)
            assert delta == 0, name
            continue
        assert value.sum().item() == pytest.approx(total, rel=TOLERANCE, abs=TOLERANCE * moved)
        assert delta == pytest.approx(moved, rel=TOLERANCE), name


@pytest.mark.slow
def test_hsnet_logits_and_vote_equal_the_official_forward():
    record = FIXTURE["hsnet"]["resnet50"]
    model = official("hsnet", record, backbone="resnet50").eval()
    five = episode(5)
    with torch.no_grad():
        logits = model.logits(five)  # [Q, N, K, 2, H, W]: each support's 1-shot logits
        labels = model(five)
    assert_close(logits[:, 0], record["logits"])
    vote = record["vote_5shot"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(vote["bits_base64"]), np.uint8))
    expected = torch.from_numpy(bits[: SIZE * SIZE].reshape(vote["shape"]).astype(np.int64))
    assert labels.dtype == torch.long and torch.equal(labels[0], expected)
    with torch.no_grad():  # 1-shot labels are the argmax of the 1-shot logits
        one = model(episode(1))
    assert torch.equal(one[0], logits[0, 0, 0].argmax(0))


@pytest.mark.slow
def test_hsnet_training_step_equals_the_official_step():
    record = FIXTURE["hsnet"]["resnet50"]
    model = official("hsnet", record, backbone="resnet50").double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert record["train_step"]["dtype"] == "float64"
    step = train_one_step(model, RECIPES["hsnet"], training_episodes(2, ignore_strip=False))
    expected = record["train_step"]
    assert step["total"] == pytest.approx(expected["loss"], rel=TOLERANCE)
    assert_weights(model, before, expected["weights"])
    assert all(
        torch.equal(before[k], v) for k, v in model.backbone.named_parameters(prefix="backbone")
    )


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5])
def test_pfenet_logits_equal_the_official_forward(shots):
    record = FIXTURE["pfenet"]["50"]
    model = official("pfenet", record, layers=50).eval()
    run = next(r for r in record["runs"] if r["shots"] == shots)
    with torch.no_grad():
        logits = model(episode(shots))
    assert_close(logits, run["logits"])


@pytest.mark.slow
def test_pfenet_training_step_equals_the_official_step():
    record = FIXTURE["pfenet"]["50"]
    model = official("pfenet", record, layers=50).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert record["train_step"]["dtype"] == "float64"
    step = train_one_step(model, RECIPES["pfenet"], training_episodes(4, ignore_strip=True))
    expected = record["train_step"]
    # the head's lr: 2.5e-3 × lr_mult 10 × poly at step 1 of 1000, as poly_learning_rate sets it
    assert step["lr"] == pytest.approx(expected["lr"], rel=1e-9)
    assert step["main"] == pytest.approx(expected["main"], rel=TOLERANCE)
    assert step["aux"] == pytest.approx(expected["aux"], rel=TOLERANCE)
    assert_weights(model, before, expected["weights"])
    running = sum(
        m.running_mean.double().sum().item()
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )  # the backbone's BatchNorm learnt the batch's statistics, as model.train() lets it
    assert running == pytest.approx(expected["running_mean_sum"], rel=TOLERANCE)


@pytest.mark.slow  # builds full-size ResNet-50 models
def test_official_checkpoint_layouts_load_and_misfits_are_one_line(tmp_path):
    from fsbench.methods.weights import read_state_dict

    record = FIXTURE["pfenet"]["50"]
    entries = [(k, tuple(s), d) for k, s, d in record["state_dict"]]
    state = seeded_state_dict(entries, 0)
    path = tmp_path / "train_epoch_200_0.6.pth"  # PFENet's released layout
    torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = METHODS.get("pfenet")(layers=50)
    model.load_official_state_dict(read_state_dict(path, "PFENet checkpoint", "fix"))
    assert torch.equal(model.cls[3].weight, state["cls.3.weight"])
    with pytest.raises(FsbenchError, match="not an official HSNet state dict"):
        METHODS.get("hsnet")(backbone="resnet50").load_official_state_dict(state)
    hsnet_entries = [(k, tuple(s), d) for k, s, d in FIXTURE["hsnet"]["resnet50"]["state_dict"]]
    hsnet_state = seeded_state_dict(hsnet_entries, 0)
    with pytest.raises(FsbenchError, match="shape mismatch"):  # a ResNet-101 file, say
        METHODS.get("hsnet")(backbone="vgg16").load_official_state_dict(
            {f"module.{k}": v for k, v in hsnet_state.items()}
        )


def test_pfenet_input_rule_is_one_line_when_a_grid_is_expanded():
    from fsbench.methods.pfenet import PFENet

    assert PFENet.input_size_problem(473) is None and PFENet.input_size_problem(417) is None
    assert "nearest input sizes: 393 or 401" in PFENet.input_size_problem(400)


PIXELS = json.loads(
    (Path(__file__).parent / "fixtures" / "official_pfenet_pixels.json").read_text()
)


@pytest.mark.slow
def test_pfenet_float_pixels_and_logits_equal_the_official_pipeline(tmp_path):
    """PFENet's test input (util/transform.py Resize on cv2's float32 pixels, ToTensor,
    Normalize) and its logits, recorded by tests/fixtures/record_official_pfenet_pixels.py on
    the same PNGs: fsbench's keep_ratio_pad input is float end to end and equals it; the same
    pixels rounded to uint8 (fsbench's former cache) do not give the official logits."""
    import importlib.util

    from PIL import Image

    from fsbench.datasets.resize import fit, normalise

    spec = importlib.util.spec_from_file_location(
        "record_pixels", Path(__file__).parent / "fixtures" / "record_official_pfenet_pixels.py"
    )
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    size = PIXELS["size"]
    inputs = []
    for path, expected in zip(recorder.images(tmp_path), PIXELS["inputs"]):
        pixels = fit(np.asarray(Image.open(path).convert("RGB")), size, "keep_ratio_pad",
                     Image.BILINEAR, 0)  # fmt: skip
        assert pixels.dtype == np.float32
        tensor = normalise(pixels)
        sample = unpack(expected["sample"])
        stride = PIXELS["stride"]
        assert (tensor[..., ::stride, ::stride] - sample).abs().max().item() <= 1e-4
        assert tensor.double().sum().item() == pytest.approx(expected["sum"], abs=1e-2)
        inputs.append(tensor)
    model = METHODS.get("pfenet")(layers=50)
    entries = [(k, tuple(shape), dtype) for k, shape, dtype in PIXELS["state_dict"]]
    model.load_official_state_dict(seeded_state_dict(entries, 0, 1.0))
    model.eval()
    mask = recorder.support_mask()[0]
    labels = torch.zeros(1, size, size, dtype=torch.long)

    def logits_of(query, support):
        episode = Episode([1], support[None, None], mask[None], 1 - mask[None], query[None], labels)
        with torch.no_grad():
            return model(episode)

    official = PIXELS["logits"]
    assert_close(logits_of(*inputs), official, PIXELS["stride"])
    rounded = [normalise(np.clip(np.rint(fit(np.asarray(Image.open(p).convert("RGB")), size,
               "keep_ratio_pad", Image.BILINEAR, 0)), 0, 255).astype(np.uint8))
               for p in sorted(tmp_path.glob("image*.png"))]  # fmt: skip
    moved = (logits_of(*rounded)[..., ::PIXELS["stride"], ::PIXELS["stride"]]
             - unpack(official["sample"])).abs().max().item()  # fmt: skip
    assert moved > TOLERANCE * official["max_abs"]  # uint8 rounding is visible in the logits
