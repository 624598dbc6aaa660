"""Fixed, fingerprinted episode lists: an episode's ids (`EpisodeSpec`), fsbench's seeded
sampler, and `EpisodeManifest` (built by replaying a protocol's official test script or by that
sampler, saved, loaded and checked)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsbench.core import (
    FsbenchError,
    atomic_write_text,
    manifest_fingerprint,
    seeded_rng,
)
from fsbench.datasets.protocols import check_sampler
from fsbench.datasets.replay import official_episodes

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class EpisodeSpec:
    """The ids of one episode: N classes, K support ids per class, the query ids."""

    classes: tuple[int, ...]
    support: tuple[tuple[str, ...], ...]
    query: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "classes": list(self.classes),
            "support": [list(s) for s in self.support],
            "query": list(self.query),
        }


def sample_episode(rng, dataset, split, classes_pool, way, shot, queries_per_way, min_pixels=1):
    """Draw one episode: `way` distinct classes, then per class `shot` supports and queries.

    Every image of an episode is distinct, so supports never repeat and never contain the query.
    """
    if way > len(classes_pool):
        raise FsbenchError(
            f"{way}-way episodes need {way} classes; the fold has {len(classes_pool)}"
        )
    classes = [int(c) for c in rng.choice(np.asarray(classes_pool), size=way, replace=False)]
    used: set[str] = set()
    supports, query = [], []
    for class_id in classes:
        pool = [i for i in dataset.class_images(split, class_id, min_pixels) if i not in used]
        need = shot + queries_per_way
        if len(pool) < need:
            raise FsbenchError(
                f"class {class_id} has {len(pool)} free images in {dataset.name}/{split}; "
                f"a {way}-way {shot}-shot episode needs {need}; lower the shot or use more data"
            )
        picked = [pool[i] for i in rng.choice(len(pool), size=need, replace=False)]
        used.update(picked)
        supports.append(tuple(picked[:shot]))
        query.extend(picked[shot:])
    return EpisodeSpec(tuple(classes), tuple(supports), tuple(query))


@dataclass(frozen=True)
class EpisodeManifest:
    """The fixed episodes of one (dataset, split, fold, way, shot, count, seed, protocol)."""

    spec: dict
    episodes: tuple[EpisodeSpec, ...]

    @classmethod
    def build(
        cls,
        dataset,
        protocol,
        fold,
        way,
        shot,
        n_episodes,
        seed,
        queries_per_way=1,
        sampler: str | None = None,
    ):
        """The episodes of one setting. `sampler` "official" (the default of a named protocol)
        replays the protocol's own test script (datasets/replay.py); "fsbench" draws with
        fsbench's sampler, seeded by the whole spec."""
        sampler = check_sampler(sampler, protocol, dataset)
        split = dataset.test_split(protocol)
        min_pixels = protocol.min_object_pixels
        spec = {
            "version": MANIFEST_VERSION,
            "dataset": dataset.name,
            "dataset_fingerprint": dataset.fingerprint(split, min_pixels),
            "split": split,
            "fold": fold,
            "way": way,
            "shot": shot,
            "queries_per_way": queries_per_way,
            "n_episodes": n_episodes,
            "seed": seed,
            "protocol": protocol.name,
        }
        if shot < 1 or way < 1 or n_episodes < 1 or queries_per_way < 1:
            raise FsbenchError(
                f"impossible episode setting {spec}: way, shot, episodes must be ≥ 1"
            )
        if sampler == "official":
            replay = official_episodes(
                dataset, protocol, fold, way, shot, n_episodes, seed, queries_per_way
            )
            # Version 2: the manifest names its sampler and lists. A version-1 manifest (no
            # `sampler` key) was drawn by fsbench's sampler, as fsbench-sampled ones still are.
            spec.update(
                version=2,
                sampler=f"official:{protocol.official_sampler}",
                lists=replay.lists,
                lists_sha256=replay.lists_sha256,
            )
            episodes = tuple(EpisodeSpec(*episode) for episode in replay.episodes)
            return cls(spec, episodes)
        rng = seeded_rng(spec)
        pool = dataset.classes_at(fold, shot)
        episodes = tuple(
            sample_episode(rng, dataset, split, pool, way, shot, queries_per_way, min_pixels)
            for _ in range(n_episodes)
        )
        return cls(spec, episodes)

    @property
    def sampler(self) -> str:
        """ "official:<lineage>" or "fsbench" (manifests without the key predate the replay)."""
        return self.spec.get("sampler", "fsbench")

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.spec, [e.to_json() for e in self.episodes])

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            **self.spec,
            "episodes": [e.to_json() for e in self.episodes],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, raw: dict, source: str = "manifest") -> EpisodeManifest:
        """A manifest from its JSON form; a fingerprint that does not match is an error."""
        try:
            episodes = tuple(
                EpisodeSpec(
                    tuple(int(c) for c in e["classes"]),
                    tuple(tuple(str(i) for i in s) for s in e["support"]),
                    tuple(str(i) for i in e["query"]),
                )
                for e in raw["episodes"]
            )
            spec = {k: v for k, v in raw.items() if k not in ("fingerprint", "episodes")}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise FsbenchError(f"{source}: not a valid episode manifest ({error!r})") from None
        manifest = cls(spec, episodes)
        if raw.get("fingerprint") and raw["fingerprint"] != manifest.fingerprint:
            raise FsbenchError(
                f"{source}: fingerprint does not match its episodes (file was edited)"
            )
        return manifest

    @classmethod
    def load_scored(cls, path: str | os.PathLike, fingerprint: str) -> EpisodeManifest:
        """The saved manifest a cell was scored on, refused unless its episodes hash to the
        cell's `fingerprint` (an edit that also rewrote or removed the file's own fingerprint
        field is caught here, not drawn as if it were the cell's episodes)."""
        manifest = cls.load(path)
        if manifest.fingerprint != fingerprint:
            raise FsbenchError(
                f"{path}: its episodes are not the ones the cell was scored on (they hash to "
                f"{manifest.fingerprint[:16]}, the cell's to {fingerprint[:16]}): the file was "
                "edited; delete it and rerun the grid, which writes it again"
            )
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike, dataset=None) -> EpisodeManifest:
        """Read a manifest file (e.g. one a paper published) and check it is intact and usable."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise FsbenchError(f"{path}: not a readable episode manifest ({error})") from None
        manifest = cls.from_json(raw, str(path))
        spec, episodes = manifest.spec, manifest.episodes
        if dataset is not None:
            known = set(dataset.list_ids(spec.get("split", "trainaug")))
            unknown = sorted({i for e in episodes for i in (*e.query, *sum(e.support, ()))} - known)
            if unknown:
                raise FsbenchError(
                    f"{path}: {len(unknown)} image ids are not in the dataset's "
                    f"{spec.get('split')} list (first: {unknown[0]}); wrong --data-root?"
                )
        return manifest
