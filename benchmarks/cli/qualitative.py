"""Qualitative episodes re-predicted from a saved checkpoint (this module imports torch, so that
report.py need not): `fsbench qualitative GRID [--cell ID] [--episodes 0 1 2 3]`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fsbench.benchmarks.execution.tasks import build_model
from fsbench.benchmarks.report.figures import qualitative_figure
from fsbench.benchmarks.store.records import CellRecord
from fsbench.benchmarks.store.results import ResultStore
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.registry import DATASETS, open_dataset
from fsbench.methods import METHODS
from fsbench.methods.base import labels_of
from fsbench.methods.weights import read_state_dict


def check_registered(result: CellRecord) -> None:
    """A cell file is data: the modules it names are never imported from it (an edited file
    would run code). A plugin method or dataset must come from the user's own `--import`."""
    config = result.config
    for kind, name, registry in (
        ("method", config.method, METHODS),
        ("dataset", config.dataset.get("name"), DATASETS),
    ):
        if name not in registry:
            modules = " ".join(f"--import {m}" for m in result.imports) or "--import MODULE"
            raise FsbenchError(
                f"cell {result.cell_id}: {kind} {name!r} is not registered; pass the module "
                f"that registers it ({modules}) — fsbench never imports what a result file names"
            )


def cell_model(result: CellRecord, grid_dir: Path):
    """A finished cell's model in eval mode: its checkpoint, or its untrained initialisation."""
    check_registered(result)
    model = build_model(result.config.to_json())  # a CellConfig: no `execution`, no imports
    if result.checkpoint:
        grid_dir = Path(grid_dir)
        problem = ResultStore(grid_dir.parent, grid_dir.name).checkpoint_problem(result, full=True)
        try:
            if problem is None:
                path = grid_dir / result.checkpoint
                model.load_state_dict(read_state_dict(path, "checkpoint", "rerun the grid"))
        except Exception as error:  # noqa: BLE001 - a bad file raises many types
            problem = f"checkpoint {path} is not loadable ({type(error).__name__})"
        if problem:
            raise FsbenchError(
                f"{problem}; run the grid again: `run` retrains the cells of a checkpoint "
                "that is gone or damaged"
            )
    return model.eval()


@torch.no_grad()
def predict_episodes(result: CellRecord, store: ResultStore, episodes: list[int]) -> list[dict]:
    """The cell's model (its checkpoint, or its untrained initialisation) on episodes of its
    first seed's manifest; predictions in episode indices, as the evaluation saved them."""
    config = result.config
    model = cell_model(result, store.grid_dir)
    seed = result.seeds[0]
    manifest = EpisodeManifest.load_scored(
        store.manifests_dir / f"{seed.manifest_fingerprint[:16]}.json", seed.manifest_fingerprint
    )
    protocol = result.preset()
    loader = EpisodeLoader(
        open_dataset(config.dataset, protocol),
        config.input_size,
        config.annotation,
        weak_seed=seed.seed,
        resize=protocol.resize,
    )
    outputs = []
    for index in episodes:
        if not 0 <= index < len(manifest.episodes):
            raise FsbenchError(f"episode {index} is outside 0…{len(manifest.episodes) - 1}")
        output = model(loader.load(manifest.episodes[index]))
        prediction = labels_of(output, model.output_kind)[0]
        outputs.append({"seed": seed.seed, "episode": index, "prediction": prediction.tolist()})
    return outputs


def render(grid_dir: Path, cell_id: str | None, episodes: list[int]) -> Path:
    """Write report/qualitative_<cell>.png for a cell (default: the best cell with a checkpoint)."""
    store = ResultStore(grid_dir.parent, grid_dir.name)
    cells = store.load_cells()
    if cell_id:
        matches = [c for c in cells if c.cell_id.startswith(cell_id)]
        if len(matches) != 1:
            raise FsbenchError(f"cell {cell_id!r} matches {len(matches)} cells in {grid_dir}")
        result = matches[0]
    else:
        trained = [c for c in cells if c.checkpoint]
        if not trained:
            raise FsbenchError(f"{grid_dir}: no cell with a checkpoint; pass --cell")
        result = max(trained, key=lambda c: c.mean("miou"))
    predictions = predict_episodes(result, store, episodes)
    out = grid_dir / "report" / f"qualitative_{result.cell_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = dataclasses.replace(result, qualitative=tuple(predictions))
    return qualitative_figure(shown, store, out, max_episodes=len(predictions))


def saved_matches_checkpoint(result: CellRecord, store: ResultStore) -> bool:
    """Whether re-predicting the saved qualitative episodes reproduces them exactly."""
    kept = result.qualitative
    again = predict_episodes(result, store, [k["episode"] for k in kept])
    return all(
        json.dumps(a["prediction"]) == json.dumps(k["prediction"]) for a, k in zip(again, kept)
    )
