"""Planning a grid run: cells still to do, their (deterministic) manifests, one job per model."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from fsbench.benchmarks.grid.files import Cell, GridSpec
from fsbench.benchmarks.store.records import other_versions
from fsbench.benchmarks.store.results import ResultStore
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeManifest
from fsbench.datasets.registry import open_dataset


@dataclass
class Job:
    """One model: trained once (if it trains), then evaluated on every (cell, seed) it serves."""

    key: str
    config: dict
    trainable: bool
    cells: list[Cell]
    items: list[dict] = field(default_factory=list)  # eval items: cell_id, seed, manifest, ...
    home: Cell | None = None  # the cell whose model this is (under its training protocol)
    upstream: str | None = None  # the job in this plan whose trained model it starts from


@dataclass
class Plan:
    cells: list[Cell]
    todo: list[Cell]
    jobs: list[Job]
    manifests: dict  # (cell id, seed) → EpisodeManifest


def _damaged_manifests(store: ResultStore, records, finished: set[str]) -> dict[str, list[int]]:
    """cell id → seeds of finished cells whose saved manifest is missing or damaged."""
    damaged: dict[str, list[int]] = {}
    intact: dict[str, bool] = {}  # fingerprint → its file checks out (cells share manifests)
    for result in records:
        if result.cell_id not in finished:
            continue
        for seed in result.seeds:
            fingerprint = seed.manifest_fingerprint
            if fingerprint not in intact:
                path = store.manifests_dir / f"{fingerprint[:16]}.json"
                try:
                    intact[fingerprint] = EpisodeManifest.load(path).fingerprint == fingerprint
                except FsbenchError:
                    intact[fingerprint] = False
            if not intact[fingerprint]:
                damaged.setdefault(result.cell_id, []).append(seed.seed)
    return damaged


def _setting(cell) -> tuple:
    """What a cell's episodes depend on besides the seed (cells sharing it share manifests)."""
    scored = cell.eval_protocol or cell.protocol
    data = json.dumps(cell.dataset, sort_keys=True)  # (a cross-domain grid has several)
    return (cell.fold, cell.way, cell.shot, cell.episodes, scored, cell.sampler, data)


def _manifest(dataset, cell, seed: int) -> EpisodeManifest:
    fold, way, shot, episodes, _, sampler, _ = _setting(cell)
    return EpisodeManifest.build(
        dataset, cell.preset, fold, way, shot, episodes, seed, sampler=sampler
    )


def plan_grid(
    grid: GridSpec, store: ResultStore, rerun: bool = False, build_manifests=True
) -> Plan:
    """Cells, the ones still to do, their jobs and their (deterministic) manifests."""
    cells = grid.expand()
    records = [] if rerun else store.load_cells()  # each cell file read and checked once
    for method, versions in other_versions(cells, records).items():
        then = ", ".join(f"{n} by version {v or '(none)'}" for v, n in versions["then"].items())
        print(
            f"fsbench: {method}: finished cells were computed by another version of its code "
            f"({then}); this is version {versions['now'] or '(none)'}, so they are recomputed",
            file=sys.stderr,
        )
    done = store.finished_ids(records)
    todo = [c for c in cells if c.id not in done]
    manifests = {}
    finished = {c.id for c in cells} & done
    damaged = _damaged_manifests(store, records, finished) if build_manifests else {}
    if build_manifests and (todo or damaged):
        opened = {}  # the dataset as each protocol scored under opens it (lists, COCO split)

        def dataset(cell):
            key = (json.dumps(cell.dataset, sort_keys=True), cell.preset.name)
            if key not in opened:
                opened[key] = open_dataset(cell.dataset, cell.preset)
            return opened[key]

        for cell in (c for c in cells if c.id in damaged):  # finished cells' records, repaired
            for seed in damaged[cell.id]:
                store.save_manifest(_manifest(dataset(cell), cell, seed))
        by_setting = {}
        for cell in todo:
            for seed in cell.seeds:
                key = (*_setting(cell), seed)
                if key not in by_setting:
                    by_setting[key] = _manifest(dataset(cell), cell, seed)
                    store.save_manifest(by_setting[key])
                manifests[(cell.id, seed)] = by_setting[key]
    jobs: dict[str, Job] = {}
    for cell in todo:
        key = cell.model_key()
        if key not in jobs:
            jobs[key] = _new_job(cell.model_cell(), grid, store)
        job = jobs[key]
        job.cells.append(cell)
        for seed in cell.seeds:
            if (cell.id, seed) in manifests:
                job.items.append(
                    {
                        "cell_id": cell.id,
                        "seed": seed,
                        "annotation": cell.annotation,
                        # scored under: its protocol's resizing, scoring and input size
                        "preset": cell.preset.to_dict(),
                        "input_size": cell.input_size,
                        "dataset": cell.dataset,  # the test set (a model may score several)
                        "manifest": manifests[(cell.id, seed)].to_json(),
                    }
                )
    _link_upstream(jobs, grid, store)
    # Longest jobs first (training, more shots): fewer idle workers at the end of a grid.
    ordered = sorted(
        jobs.values(), key=lambda j: (not j.trainable, -max((c.shot for c in j.cells), default=9))
    )
    return Plan(cells, todo, ordered, manifests)


def _new_job(home: Cell, grid: GridSpec, store: ResultStore) -> Job:
    """The job of `home`'s model (the cell under its training protocol), with no cells yet."""
    key = home.model_key()
    # How to run, not what is computed (outside the cell's identity). Paths entering a task
    # are absolute; a retried or rerun training resumes from its checkpoint.
    execution = {
        "imports": list(grid.imports),  # a worker imports them before building anything
        "plugin_paths": list(grid.plugin_paths),
        "train_workers": grid.train_workers,
        "checkpoint_every": grid.checkpoint_every,
        # Encodings beyond cache_bytes spill here, up to spill_bytes of disk.
        "spill_dir": str(store.root / "cache"),
        "spill_bytes": grid.spill_bytes,
        "resume_path": str(store.resume_path(key)),
    }
    # The resolved protocol travels with the job: tasks never look it up again.
    config = {**home.config(), "preset": home.preset.to_dict(), "execution": execution}
    return Job(key, config, home.train is not None, [], home=home)


def _link_upstream(jobs: dict[str, Job], grid: GridSpec, store: ResultStore) -> None:
    """Each `init_from` job's config names the model it starts from: trained in this run (the
    job's `upstream`, its weights handed over as they are made), or finished by an earlier run
    (its saved checkpoint, never retrained). An upstream whose cells are done but whose
    checkpoint is gone is trained again, alone."""
    waiting = [job for job in jobs.values() if job.home is not None]
    while waiting:
        job = waiting.pop()
        upstream = job.home.upstream
        if upstream is None or "init_from_model" in job.config:
            continue
        key = upstream.model_key()
        checkpoint = store.checkpoints_dir / f"{key}.pt"
        if key not in jobs and upstream.train is not None and not checkpoint.is_file():
            jobs[key] = _new_job(upstream, grid, store)  # train-only: its cells are done
            waiting.append(jobs[key])
        if key in jobs and jobs[key].trainable:
            job.upstream = key
        job.config["init_from_model"] = {
            "key": key,
            "config": jobs[key].config if key in jobs else _new_job(upstream, grid, store).config,
            "checkpoint": str(checkpoint) if upstream.train is not None else None,
        }
