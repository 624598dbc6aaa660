"""The foundation-model methods equal their official code, run side by side with random weights
(small configurations of the same code paths): tests/fixtures/official_parity_gf_sam.json was
recorded by tests/fixtures/record_official_gf_sam.py from a checkout of ANDYZAQ/GF-SAM, on the
generated LVIS-92i data, through its own data loader and main_eval.py's calls. Here the same
episodes run through fsbench's engine (the `matcher` protocol at 1024 px, the replayed
manifest, the loader, the encodings cache and the support-states path): the final masks are
identical, and the similarity maps, the prompt points and SAM's logits agree within 1e-4."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import seeded_state_dict

from fsbench.benchmarks.evaluation.cache import FeatureCache
from fsbench.benchmarks.evaluation.evaluate import evaluate_model
from fsbench.datasets.episodes import EpisodeLoader
from fsbench.datasets.lvis import Lvis92i
from fsbench.datasets.manifests import EpisodeManifest
from fsbench.datasets.protocols import resolve
from fsbench.datasets.synthetic_lvis import write_lvis
from fsbench.methods import METHODS

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "official_parity_gf_sam.json").read_text())
PERSAM = json.loads((FIXTURES / "official_parity_persam.json").read_text())
MATCHER = json.loads((FIXTURES / "official_parity_matcher.json").read_text())


def array(record) -> torch.Tensor:
    values = np.frombuffer(base64.b64decode(record["base64"]), np.float32)
    return torch.from_numpy(values.reshape(record["shape"]).copy())


def gf_sam_with_the_recorded_weights():
    model = METHODS.get("gf_sam")(sam="tiny", dinov2="tiny", sam_weights="random",
                                  dinov2_weights="random")  # fmt: skip
    entries = {k: [(n, tuple(s), d) for n, s, d in v] for k, v in FIXTURE["entries"].items()}
    model.dinov2.load_official(seeded_state_dict(entries["dinov2"], 0, 1.0))
    model.sam.load_state_dict(seeded_state_dict(entries["sam"], 1, 1.0))
    return model.eval()


@pytest.fixture(scope="module")
def lvis(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis")
    write_lvis(root, *FIXTURE["data"])
    return Lvis92i(root)


def bits_sha(mask: torch.Tensor) -> str:
    bits = mask.bool().numpy().astype(np.uint8)
    return hashlib.sha256(np.packbits(bits).tobytes()).hexdigest()


@pytest.mark.slow
def test_the_full_size_encoders_have_the_official_shapes_and_sizes():
    # SAM ViT-H and DINOv2 ViT-L/14 as the methods build them, on the meta device (no memory,
    # no compute): the official parameter counts (sam_vit_h_4b8939.pth holds 641,090,608; the
    # DINOv2 file 304,368,640 with its unused 1024-float mask token) and embedding shapes
    from fsbench.methods.foundation import Dinov2, build_sam

    with torch.device("meta"):
        dinov2, sam = Dinov2("vit_large", "random"), build_sam("vit_h", "random")
        tokens = dinov2(torch.zeros(2, 3, 518, 518))
        embedding = sam.image_encoder(torch.zeros(2, 3, 1024, 1024))
    assert tokens.shape == (2, 37 * 37, 1024) and embedding.shape == (2, 256, 64, 64)
    assert sum(p.numel() for p in sam.parameters()) == 641_090_608
    assert sum(p.numel() for p in dinov2.parameters()) == 304_368_640 - 1024
    for name in ("gf_sam", "persam", "persam_f", "matcher"):
        assert METHODS.provides(name).cost and METHODS.provides(name).pretraining


def same_points(ours, theirs) -> bool:
    """The engine runs episodes by query image: a trace is found by its prompt points."""
    return np.shape(ours) == np.shape(theirs) and np.allclose(ours, theirs)


@pytest.mark.slow
def test_matcher_masks_equal_the_official_code_episode_after_episode(lvis):
    # Its prompt sampler's Python generator runs on through a manifest's episodes: each run is
    # one manifest evaluated in order, as one main_oss.py run
    from fsbench.benchmarks.evaluation.evaluate import evaluate

    model = METHODS.get("matcher")(
        sam="tiny", dinov2="tiny", sam_weights="random", dinov2_weights="random",
        sam_image_size=MATCHER["sam_side"], points_per_side=MATCHER["points_per_side"],
    )  # fmt: skip
    entries = {k: [(n, tuple(s), d) for n, s, d in v] for k, v in MATCHER["entries"].items()}
    model.dinov2.load_official(seeded_state_dict(entries["dinov2"], 0, 1.0))
    model.sam.load_state_dict(seeded_state_dict(entries["sam"], MATCHER["weight_seed"], 1.0))
    with torch.no_grad():  # the recorder's `tune`: masks that pass Matcher's filters
        model.sam.mask_decoder.iou_prediction_head.layers[-1].bias += MATCHER["iou_bias"]
        for mlp in model.sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= MATCHER["mask_gain"]
    model.eval()
    protocol = resolve("matcher", lvis)
    loader = EpisodeLoader(lvis, protocol.input_size, resize=protocol.resize)
    for run in MATCHER["runs"]:
        count = len(run["episodes"])
        manifest = EpisodeManifest.build(lvis, protocol, run["fold"], 1, run["shot"], count, 0)
        model.trace = []
        with torch.no_grad():
            _, _, kept = evaluate(model, loader, manifest, protocol, keep_predictions=count)
        for spec, item, trace, expected in zip(manifest.episodes, kept, model.trace,
                                               run["episodes"]):  # fmt: skip
            assert (list(spec.support[0]), spec.query[0]) == (expected["support"],
                                                              expected["query"])  # fmt: skip
            assert trace["points"].tolist() == expected["points"]
            assert int(item["prediction"].sum()) == expected["foreground"]
            assert bits_sha(item["prediction"]) == expected["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["persam", "persam_f"])
def test_persam_masks_equal_the_official_scripts(lvis, name):
    model = METHODS.get(name)(sam="tiny", sam_weights="random")
    entries = [(n, tuple(s), d) for n, s, d in PERSAM["entries"]]
    model.sam.load_state_dict(seeded_state_dict(entries, PERSAM["weight_seed"], 1.0))
    model.eval()
    size, records = PERSAM["size"], PERSAM[name]
    protocol = dataclasses.replace(resolve("matcher", lvis), input_size=size)
    manifest = EpisodeManifest.build(lvis, protocol, 0, 1, 1, len(records), 0)
    loader = EpisodeLoader(lvis, size, resize=protocol.resize)
    cache = FeatureCache(model, loader, "cpu", batch_size=2)
    with torch.no_grad():
        ((_, _, kept),) = evaluate_model(model, cache, [(loader, manifest, protocol)], "cpu", 9)
    for spec, item, expected in zip(manifest.episodes, kept, records):
        assert (spec.support[0][0], spec.query[0]) == (expected["support"], expected["query"])
        assert int(item["prediction"].sum()) == expected["foreground"]
        assert bits_sha(item["prediction"]) == expected["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("run", FIXTURE["runs"], ids=lambda r: f"{r['shot']}shot")
def test_gf_sam_masks_and_maps_equal_the_official_code(lvis, run):
    model = gf_sam_with_the_recorded_weights()
    protocol = dataclasses.replace(resolve("matcher", lvis), input_size=1024)
    count = len(run["episodes"])
    manifest = EpisodeManifest.build(lvis, protocol, run["fold"], 1, run["shot"], count, 0)
    loader = EpisodeLoader(lvis, 1024, resize=protocol.resize)
    for spec, expected in zip(manifest.episodes, run["episodes"]):
        assert (list(spec.support[0]), spec.query[0]) == (expected["support"], expected["query"])
    # the engine's path: each image encoded once, support states, labels scored at 1024 px
    cache = FeatureCache(model, loader, "cpu", batch_size=2)
    model.trace = []
    with torch.no_grad():
        ((_, _, kept),) = evaluate_model(model, cache, [(loader, manifest, protocol)], "cpu", count)
    assert cache.encoded == len({i for e in manifest.episodes for i in (*e.support[0], *e.query)})
    for item, expected in zip(kept, run["episodes"]):
        assert int(item["prediction"].sum()) == expected["mask"]["foreground"]
        assert bits_sha(item["prediction"]) == expected["mask"]["sha256"]
        trace = next(t for t in model.trace if same_points(t["points"], expected["points"]))
        for name in ("sim", "mean", "neg_mean", "filtered"):
            torch.testing.assert_close(trace[name], array(expected[name]), atol=1e-4, rtol=0)
        torch.testing.assert_close(trace["low_res"][0][:4, 0, ::8, ::8],
                                   array(expected["low_res"]), atol=1e-4, rtol=0)  # fmt: skip


def test_gf_sam_declares_its_path_data_and_input():
    cls = type(METHODS.get("gf_sam")(sam="tiny", dinov2="tiny", sam_weights="random",
                                     dinov2_weights="random"))  # fmt: skip
    assert cls.evaluation_path() == "support_states" and cls.output_kind == "labels"
    assert cls.pretraining == ("SA-1B", "LVD-142M") and not cls.trainable
    model = METHODS.get("test_gf_sam")()
    assert model.sam.image_encoder.img_size == 256 and model.max_points == 4
