"""The method contract (methods/base.py) as the engine reads it: one dispatch on declared
attributes, support states of multi-map encodings, label outputs scored as labels, the input-size
rule at grid expansion, the public evaluator interface, and the cache's budgets."""

import numpy as np
import pytest
import torch
import yaml

import fsbench
from fsbench.benchmarks.evaluation.cache import FeatureCache, distinct_images
from fsbench.benchmarks.evaluation.evaluate import evaluate, evaluate_model
from fsbench.benchmarks.evaluation.evaluator import Evaluator
from fsbench.benchmarks.grid.files import parse_grid
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import get_protocol
from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod

PANET = get_protocol("panet")


@pytest.fixture
def vote():
    from vote_method import ShotVote  # tests/ is on the path (conftest): a plugin module

    torch.manual_seed(0)
    return ShotVote().eval()


def test_dispatch_follows_the_declarations_of_every_bundled_method():
    paths = {name: METHODS.provides(name).evaluation_path() for name in METHODS.list()}
    assert paths["panet"] == paths["prototype_notrain"] == "support_states"
    assert paths["sgone"] == paths["canet"] == paths["linear_probe"] == "features"
    assert paths["all_background"] == "episode"
    with pytest.raises(FsbenchError, match="support_states needs cacheable_encoder"):
        type("Broken", (FewShotMethod,), {"support_states": True})
    with pytest.raises(FsbenchError, match="output_kind 'probabilities'"):
        type("Broken", (FewShotMethod,), {"output_kind": "probabilities"})


@pytest.mark.parametrize("way, shot", [(1, 1), (1, 3), (2, 2)])
def test_multi_map_support_states_with_label_outputs_equal_the_per_episode_forward(
    dataset, vote, way, shot
):
    # The latent bug: a "maps" method on the prototype path got packed [D, 1, 1] vectors. Now
    # its states come from unpacked maps, with a cache small enough to spill, and the labels it
    # returns are scored as labels: counts and kept predictions equal model(episode)'s.
    manifest = EpisodeManifest.build(dataset, PANET, 0, way, shot, 12, 3, sampler="fsbench")
    loader = EpisodeLoader(dataset, 32)
    plain, _, plain_kept = evaluate(vote, loader, manifest, PANET, keep_predictions=3)
    one = 4 * (8 * 8 * 8 + 8 * 4 * 4)
    cache = FeatureCache(vote, loader, "cpu", max_bytes=2 * one, batch_size=4)
    ((counts, _, kept),) = evaluate_model(vote, cache, [(loader, manifest, PANET)], "cpu", 3)
    assert cache.feature_bytes == one and cache.spilled > 0
    assert cache.encoded == len(distinct_images([manifest]))  # each image encoded once
    assert np.array_equal(plain.per_class, counts.per_class)
    assert np.array_equal(plain.foreground, counts.foreground)
    assert [k["episode"] for k in kept] == [0, 1, 2]
    assert all(torch.equal(a["prediction"], b["prediction"]) for a, b in zip(kept, plain_kept))
    assert kept[0]["prediction"].dtype == torch.long and kept[0]["prediction"].max() <= way


def test_the_budgets_decide_the_path_and_a_misfit_is_one_line(dataset, capsys):
    model = METHODS.get("test_sgone")().eval()
    manifest = EpisodeManifest.build(dataset, PANET, 0, 1, 1, 6, 3, sampler="fsbench")
    loader = EpisodeLoader(dataset, 32)
    jobs = [(loader, manifest, PANET)]
    roomy = FeatureCache(model, loader, "cpu", batch_size=4, spill_bytes=0)
    ((cached, _, _),) = evaluate_model(model, roomy, jobs)
    assert roomy.encoded == len(distinct_images([manifest])) and "fsbench:" not in (
        capsys.readouterr().err
    )
    tight = FeatureCache(model, loader, "cpu", max_bytes=0, batch_size=4, spill_bytes=0)
    ((episodic, _, _),) = evaluate_model(model, tight, jobs)
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "evaluating episode by episode" in line
    assert tight.encoded == 1  # the probe; the episodes ran model(episode)
    assert np.array_equal(cached.per_class, episodic.per_class)


def test_spill_stays_inside_its_folder_and_disk_budget(dataset, tmp_path):
    model = METHODS.get("test_sgone")().eval()
    loader = EpisodeLoader(dataset, 32)
    manifest = EpisodeManifest.build(dataset, PANET, 0, 1, 1, 6, 3, sampler="fsbench")
    ids = distinct_images([manifest])
    cache = FeatureCache(model, loader, "cpu", max_bytes=1, batch_size=4, spill_dir=tmp_path)
    cache.prefetch(ids)
    one = cache.feature_bytes
    assert cache.peak_spill_bytes == (len(ids) - 1) * one  # the first map stays in memory
    assert cache.spill_bytes > 0  # from the free space of tmp_path's disk
    cache.close()
    small = FeatureCache(
        model, loader, "cpu", max_bytes=1, batch_size=4, spill_dir=tmp_path, spill_bytes=one
    )
    with pytest.raises(FsbenchError, match="spill_bytes"):
        small.prefetch(ids)
    small.close()


class QueriesSeen(Evaluator):
    """A plugin evaluator: how many queries it was shown, and their predicted foreground."""

    def reset(self):
        self.queries, self.foreground = 0, 0

    def process(self, outputs, labels, refs):
        self.queries += len(refs)
        self.foreground += int((outputs.argmax(1) > 0).sum())

    def result(self):
        return self.queries, self.foreground


def test_a_plugin_evaluator_is_fed_the_same_batches(dataset):
    model = METHODS.get("test_all_foreground")()
    manifest = EpisodeManifest.build(dataset, PANET, 0, 1, 1, 5, 3, sampler="fsbench")
    seen = QueriesSeen()
    counts, _, _ = evaluate(model, EpisodeLoader(dataset, 32), manifest, PANET, evaluators=[seen])
    assert seen.result() == (5, 5 * 32 * 32)  # every query pixel predicted foreground
    assert len(counts.per_class) == 5


def _vote_grid(voc_root, **extra):
    return {
        "name": "vote",
        "imports": ["vote_method"],
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "input_size": 32,
        "episodes": 4,
        "seeds": [1],
        "folds": [0],
        "shots": [2],
        "sampler": "fsbench",
        "methods": ["shot_vote"],
        "train": {"steps": 3, "lr_milestones": [2], "log_every": 1},
        **extra,
    }


def test_input_size_rule_is_checked_when_the_grid_expands(voc_root):
    with pytest.raises(FsbenchError) as error:
        parse_grid(_vote_grid(voc_root, input_size=30)).expand()
    message = str(error.value)
    assert "shot_vote" in message and "30" in message and "24 or 32" in message
    with pytest.raises(FsbenchError, match="train.input_size 20"):
        parse_grid(_vote_grid(voc_root, train={"steps": 3, "input_size": 20})).expand()
    assert len(parse_grid(_vote_grid(voc_root)).expand()) == 1


def test_a_label_output_plugin_trains_and_is_scored_in_a_grid_run(voc_root, tmp_path):
    grid_file = tmp_path / "vote.yaml"
    grid_file.write_text(yaml.safe_dump(_vote_grid(voc_root)))
    frame = fsbench.run(grid_file, results=tmp_path / "results", serial=True, tracking=False)
    assert len(frame) == 1 and 0 <= frame.miou.iloc[0] <= 100
    record = next((tmp_path / "results" / "vote" / "cells").glob("*.json")).read_text()
    assert '"prediction"' in record and '"peak_rss_bytes"' in record


@pytest.mark.slow  # runs a whole grid
def test_registered_evaluators_named_in_a_grid_run_on_every_path(tmp_path, small_grid_dict):
    """`evaluators: [query_stats]` (a plugin's registered Evaluator): fed on the support-states,
    features and episode paths alike, its result kept per seed; the grid's cells get new ids
    (their records hold more), and an unknown name is one line."""
    from fsbench.benchmarks.cli.api import run
    from fsbench.benchmarks.store.results import ResultStore

    methods = ["test_panet_nopar", "test_sgone", "all_background"]
    paths = {METHODS.provides(m).evaluation_path() for m in methods}
    assert paths == {"support_states", "features", "episode"}
    grid = dict(
        small_grid_dict,
        imports=["query_stats"],
        evaluators=["query_stats"],
        seeds=[1],
        methods=methods,
        train={"steps": 2, "lr_milestones": [1]},
    )
    run(grid, results=tmp_path / "r", serial=True, tracking=False)
    records = ResultStore(tmp_path / "r", "tiny").load_cells()
    assert len(records) == 3
    for record in records:
        (seed,) = record.seeds
        stats = seed.evaluators["query_stats"]
        assert stats["queries"] == seed.episodes == 6 and 0 <= stats["pixel_accuracy"] <= 1
    plain = parse_grid(dict(grid, evaluators=None, imports=[])).expand()
    assert {c.id for c in plain}.isdisjoint(r.cell_id for r in records)
    with pytest.raises(FsbenchError, match="unknown evaluator 'nope'"):
        parse_grid(dict(grid, evaluators=["nope"]))
