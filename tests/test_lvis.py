"""LVIS-92i in Matcher's formats (its pickles, or built from the LVIS v1 JSON), the `matcher`
protocol's episodes replayed draw for draw (fixtures recorded by running Matcher's own
matcher/data/lvis.py: tests/fixtures/record_official_matcher.py), and bad input in one line."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from fsbench.benchmarks.cli.main import main
from fsbench.core import FsbenchError
from fsbench.datasets.lvis import Lvis92i, classwise_from_json
from fsbench.datasets.manifests import EpisodeManifest
from fsbench.datasets.protocols import PROTOCOLS, resolve
from fsbench.datasets.synthetic_lvis import write_lvis

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "official_matcher_lvis_episodes.json").read_text()
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis")
    write_lvis(root, *FIXTURE["data"])
    return root


def _digest(episodes) -> str:
    rows = [[e.classes[0], list(e.support[0]), e.query[0]] for e in episodes]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("run", FIXTURE["runs"], ids=lambda r: f"fold{r['fold']}-{r['shot']}shot")
def test_matcher_replay_equals_its_own_lvis_loader(generated, run):
    dataset = Lvis92i(generated)
    protocol = resolve("matcher", dataset)
    assert protocol.episodes == FIXTURE["episodes"] == 2300
    assert dataset.classes_at(run["fold"], run["shot"]) == run["classes"]
    manifest = EpisodeManifest.build(dataset, protocol, run["fold"], 1, run["shot"], 2300, 0)
    assert manifest.sampler == "official:matcher"
    first = [[e.classes[0], list(e.support[0]), e.query[0]] for e in manifest.episodes[:30]]
    assert first == run["first"]
    assert _digest(manifest.episodes) == run["sha256"]
    for pixels, episode in zip(run["query_pixels"], manifest.episodes):
        masks, void = dataset.load_masks(episode.query[0], episode.classes)
        assert int(masks[0].sum()) == pixels and not void.any()


def test_one_and_five_shot_folds_hold_different_classes(generated):
    dataset = Lvis92i(generated)
    assert dataset.classes_at(0, 1) != dataset.classes_at(0, 5)
    assert dataset.fold_classes(0) == dataset.classes_at(0, 1)
    every = [c for f in range(10) for c in dataset.classes_at(f, 1)]
    assert len(every) == len(set(every))  # folds are disjoint


def test_matcher_protocol_is_hsnets_geometry_at_518():
    matcher, hsnet = PROTOCOLS["matcher"], PROTOCOLS["hsnet"]
    assert (matcher.resize, matcher.score_resolution, matcher.seeds) == (
        hsnet.resize, hsnet.score_resolution, hsnet.seeds
    )  # fmt: skip
    assert matcher.input_size == 518 and matcher.episodes == 1000
    assert resolve("matcher", "fss1000").episodes == 2400
    assert resolve("matcher", "coco20i").episodes == 1000


def test_the_json_builds_the_pickles_structure_and_the_manifest_says_which(generated, tmp_path):
    root = tmp_path / "json"
    shutil.copytree(generated / "LVIS", root / "LVIS")
    for split in ("train", "val"):
        (root / "LVIS" / f"lvis_{split}.pkl").unlink()
    from_json, from_pickle = Lvis92i(root), Lvis92i(generated)
    assert "LVIS v1 JSON" in from_json.lists_source and "pickle" in from_pickle.lists_source
    with open(generated / "LVIS" / "lvis_val.pkl", "rb") as handle:
        assert classwise_from_json(root / "LVIS" / "lvis_v1_val.json") == pickle.load(handle)
    protocol = resolve("matcher", from_json)
    a = EpisodeManifest.build(from_json, protocol, 0, 1, 1, 50, 0)
    b = EpisodeManifest.build(from_pickle, protocol, 0, 1, 1, 50, 0)
    assert a.episodes == b.episodes
    assert "built from the LVIS v1 JSON" in a.spec["lists"] and "pickle" in b.spec["lists"]


def test_manifest_cli_writes_matchers_episodes(generated, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["manifest", "--dataset", "lvis92i", "--data-root", str(generated)]
    argv += ["--protocol", "matcher", "--fold", "9", "--shot", "5", "--seed", "0"]
    argv += ["--output", str(out)]
    assert main(argv) == 0
    assert "official:matcher" in capsys.readouterr().out
    written = json.loads(out.read_text())["episodes"]
    record = next(r for r in FIXTURE["runs"] if (r["fold"], r["shot"]) == (9, 5))
    assert len(written) == 2300
    assert [[e["classes"][0], e["support"][0], e["query"][0]] for e in written[:30]] == record[
        "first"
    ]


def _broken(generated, tmp_path, data) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(generated / "LVIS", root / "LVIS")
    with open(root / "LVIS" / "lvis_val.pkl", "wb") as handle:
        pickle.dump(data, handle)
    return root


def test_bad_lvis_input_is_one_line_naming_the_file_and_entry(generated, tmp_path):
    with pytest.raises(FsbenchError, match="does not exist"):
        Lvis92i(tmp_path / "nowhere")
    (tmp_path / "empty" / "LVIS").mkdir(parents=True)
    with pytest.raises(FsbenchError, match=r"neither lvis_val.pkl nor lvis_v1_val.json"):
        Lvis92i(tmp_path / "empty")
    with pytest.raises(FsbenchError, match=r"lvis_val.pkl: expected a dict"):
        Lvis92i(_broken(generated, tmp_path / "a", [1, 2]))
    with pytest.raises(FsbenchError, match=r"category 5 image 'x.jpg' has no 'annotations'"):
        Lvis92i(_broken(generated, tmp_path / "b", {5: {"x.jpg": {}}}))
    twice = {5: {"train2017/000000000007.jpg": {"annotations": []},
                 "val2017/000000000007.jpg": {"annotations": []}}}  # fmt: skip
    with pytest.raises(FsbenchError, match=r"category 5 lists image 000000000007 twice"):
        Lvis92i(_broken(generated, tmp_path / "c", twice))
    root = tmp_path / "d"
    shutil.copytree(generated / "LVIS", root / "LVIS")
    (root / "LVIS" / "lvis_val.pkl").unlink()
    (root / "LVIS" / "lvis_v1_val.json").write_text('{"images": []}')
    with pytest.raises(FsbenchError, match=r"lvis_v1_val.json: not an LVIS v1 JSON"):
        Lvis92i(root)
    with pytest.raises(FsbenchError, match="folds 0…9"):
        Lvis92i(generated).classes_at(10, 1)
