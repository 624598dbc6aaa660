"""The bundled baselines equal their official code: official weights load through
`load_official_state_dict` and the eval-mode logits equal the official forward's.

tests/fixtures/official_parity.json was recorded by tests/fixtures/record_official_parity.py,
which runs the official models (kaixin96/PANet, xiaomengyc/SG-One, icoz69/CaNet) with the same
deterministic weights (tests/helpers.py `seeded_state_dict` over their own state-dict names) on
the episode built below.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import parity_episode, seeded_state_dict

from fsbench.core import FsbenchError
from fsbench.methods import METHODS

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_parity.json").read_text())
TOLERANCE = 1e-4


def unpack(packed) -> torch.Tensor:
    data = np.frombuffer(base64.b64decode(packed["float32_base64"]), dtype=np.float32)
    return torch.from_numpy(data.copy()).view(packed["shape"])


def episode(shots: int):
    return parity_episode(FIXTURE["size"], shots)


def official_model(name: str, **kwargs):
    record = FIXTURE[name]
    model = METHODS.get(name)(**kwargs)
    entries = [(k, tuple(shape), dtype) for k, shape, dtype in record["state_dict"]]
    gain = FIXTURE["weight_gain"][name]
    model.load_official_state_dict(seeded_state_dict(entries, FIXTURE["weight_seed"], gain))
    return model.eval(), record


def logits(model, shots, **predict_kwargs):
    query, supports, fg = episode(shots)
    with torch.no_grad():
        features = model.encode(torch.cat([supports, query]))
        return model.predict(
            features[:shots][None],
            fg[None],
            1 - fg[None],
            features[shots:],
            query.shape[-2:],
            **predict_kwargs,
        )


@pytest.mark.parametrize("name", ["panet", "sgone"])
def test_logits_equal_the_official_forward(name):
    model, record = official_model(name)
    for run in record["runs"]:
        expected = unpack(run["logits"])
        mine = logits(model, run["shots"])
        assert mine.shape == expected.shape
        assert (mine - expected).abs().max().item() <= TOLERANCE, (name, run["shots"])
        assert expected.abs().max() > 0.1  # not a degenerate all-zero output


@pytest.mark.parametrize("iterations", [1, 4])
def test_canet_logits_equal_the_official_forward_and_refinement(iterations):
    model, record = official_model("canet")
    run = next(r for r in record["runs"] if r["iterations"] == iterations)
    expected = unpack(run["logits"])
    mine = logits(model, 1, iterations=iterations)
    assert (mine - expected).abs().max().item() <= TOLERANCE
    other = logits(model, 1, iterations=5 - iterations)  # refinement changes the logits
    assert (other - expected).abs().max().item() > 10 * TOLERANCE


def test_official_checkpoints_with_dataparallel_prefix_and_clear_errors():
    record = FIXTURE["canet"]
    entries = [(k, tuple(shape), dtype) for k, shape, dtype in record["state_dict"]]
    state = seeded_state_dict(entries, 0)
    model = METHODS.get("canet")()
    model.load_official_state_dict({f"module.{k}": v for k, v in state.items()})
    assert torch.equal(model.classifier.weight, state["layer9.weight"])
    broken = dict(state)
    del broken["layer7.0.weight"]
    broken["layer9.weight"] = torch.zeros(3, 256, 1, 1)
    with pytest.raises(FsbenchError, match=r"missing project\.0\.weight.*shape mismatch"):
        model.load_official_state_dict(broken)
    with pytest.raises(FsbenchError, match="not an official PANet state dict"):
        METHODS.get("panet")().load_official_state_dict(state)


def test_grid_evaluates_an_official_checkpoint_without_training(tmp_path, small_grid_dict):
    """`checkpoint: PATH` + `format: official` on a method entry: no training, the released
    weights are evaluated (equal to evaluating them directly), and the cell records them."""
    from fsbench.benchmarks.cli.api import run
    from fsbench.benchmarks.evaluation.evaluate import evaluate
    from fsbench.benchmarks.grid.files import parse_grid
    from fsbench.benchmarks.store.results import ResultStore
    from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
    from fsbench.datasets.protocols import get_protocol
    from fsbench.datasets.registry import open_dataset

    torch.manual_seed(3)
    released = METHODS.get("test_panet")()
    official_names = [  # how kaixin96/PANet names the same tensors (models/vgg.py)
        f"module.encoder.backbone.features.{2 * stage}.{2 * index}.{kind}"
        for stage, n_convs in enumerate((2, 2, 3, 3, 3))
        for index in range(n_convs)
        for kind in ("weight", "bias")
    ]
    path = tmp_path / "30000.pth"
    torch.save(dict(zip(official_names, released.state_dict().values())), path)
    grid_dict = dict(
        small_grid_dict,
        seeds=[1],
        methods=[{"name": "test_panet", "checkpoint": str(path), "format": "official"}],
    )
    frame = run(grid_dict, results=tmp_path / "results", serial=True, tracking=False)
    store = ResultStore(tmp_path / "results", "tiny")
    (record,) = store.load_cells()
    assert record.train is None and record.config.checkpoint["format"] == "official"
    grid = parse_grid(grid_dict)
    manifest = EpisodeManifest.load(
        store.manifests_dir / f"{record.seeds[0].manifest_fingerprint[:16]}.json"
    )
    loader = EpisodeLoader(open_dataset(grid.dataset, grid.protocol), grid_dict["input_size"])
    counts, _, _ = evaluate(released.eval(), loader, manifest, get_protocol("panet"))
    assert frame["miou"].iloc[0] == pytest.approx(100 * counts.miou())
    with pytest.raises(FsbenchError, match="does not exist"):
        parse_grid(dict(grid_dict, methods=[{"name": "test_panet", "checkpoint": "/nope.pth"}]))
