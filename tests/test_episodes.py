import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import IMAGENET_MEAN, IMAGENET_STD, EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import get_protocol

PANET = get_protocol("panet")


@pytest.mark.slow
def test_fingerprint_same_in_fresh_process_and_differs_by_seed(dataset, voc_root, tmp_path):
    manifest = EpisodeManifest.build(dataset, PANET, 1, 1, 1, 20, 1234)
    code = (
        "from fsbench.datasets.pascal import Pascal5i;"
        "from fsbench.datasets.episodes import EpisodeManifest;"
        "from fsbench.datasets.protocols import get_protocol;"
        f"d = Pascal5i({str(voc_root)!r}, cache_dir={str(tmp_path)!r});"
        "print(EpisodeManifest.build(d, get_protocol('panet'), 1, 1, 1, 20, 1234).fingerprint)"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == manifest.fingerprint
    other = EpisodeManifest.build(dataset, PANET, 1, 1, 1, 20, 1235)
    assert other.fingerprint != manifest.fingerprint


@pytest.mark.parametrize("way,shot", [(1, 1), (1, 5), (2, 1), (3, 2)])
def test_supports_distinct_never_query_and_contain_class(dataset, way, shot):
    """fsbench's own sampler (PANet's official one draws each class on its own: in N-way
    episodes a query may be another class's support, as tests/test_replay.py records)."""
    manifest = EpisodeManifest.build(dataset, PANET, 0, way, shot, 30, 7, sampler="fsbench")
    for episode in manifest.episodes:
        assert len(set(episode.classes)) == way
        assert set(episode.classes) <= set(dataset.fold_classes(0))
        ids = [i for ids in episode.support for i in ids]
        assert len(ids) == way * shot == len(set(ids))
        assert not set(ids) & set(episode.query)
        for class_id, support in zip(episode.classes, episode.support):
            for image_id in support:
                assert (dataset.load_label(image_id) == class_id).any()
        for class_id, query in zip(episode.classes, episode.query):
            assert (dataset.load_label(query) == class_id).any()


def test_episode_tensors_and_masks(dataset):
    # fsbench's sampler: one query per way (PANet's official test draws one per episode)
    manifest = EpisodeManifest.build(dataset, PANET, 0, 2, 3, 2, 3, sampler="fsbench")
    episode = EpisodeLoader(dataset, 40).load(manifest.episodes[0])
    assert episode.support_images.shape == (2, 3, 3, 40, 40)
    assert episode.support_fg.shape == episode.support_bg.shape == (2, 3, 40, 40)
    assert episode.query_images.shape == (2, 3, 40, 40)
    assert episode.query_labels.dtype == torch.long
    assert set(episode.query_labels.unique().tolist()) <= {0, 1, 2, 255}
    assert not (episode.support_fg * episode.support_bg).any()  # disjoint
    label = torch.from_numpy(
        np.array(EpisodeLoader(dataset, 40).masks(episode.support_ids[0][0], episode.class_ids)[1])
    )
    # the 255 outline counts as background for the support masks (PANet's getMask)
    assert (episode.support_bg[0, 0][label] == 1).all()


def test_manifest_file_roundtrip_and_tamper_detection(dataset, tmp_path):
    manifest = EpisodeManifest.build(dataset, PANET, 2, 1, 1, 5, 1)
    path = manifest.save(tmp_path / "m.json")
    raw = json.loads(path.read_text())
    assert raw["fingerprint"] == manifest.fingerprint
    assert set(raw["episodes"][0]) == {"classes", "support", "query"}
    again = EpisodeManifest.load(path, dataset)
    assert again.fingerprint == manifest.fingerprint and again.episodes == manifest.episodes
    raw["episodes"][0]["query"] = ["2008_000001"]
    path.write_text(json.dumps(raw))
    with pytest.raises(FsbenchError, match="fingerprint does not match"):
        EpisodeManifest.load(path)


def test_impossible_shot_is_a_clear_error(dataset):
    with pytest.raises(FsbenchError, match="needs"):
        EpisodeManifest.build(dataset, PANET, 0, 1, 500, 1, 0)


def test_keep_ratio_pad_resize_pads_image_and_voids_labels(dataset):
    """PFENet's Resize: longer side to S, sides floored to ×8, padded with raw black (image)
    and 255 (label); the padding is void everywhere: never query or support background."""
    manifest = EpisodeManifest.build(dataset, PANET, 0, 1, 1, 1, 4, sampler="fsbench")
    spec = manifest.episodes[0]
    loader = EpisodeLoader(dataset, 40, resize="keep_ratio_pad")
    height, width = dataset.load_image(spec.query[0]).shape[:2]  # 48 x 64: landscape
    assert loader.content_size(height, width) == (24, 40)  # int(48 * 40 / 64) = 30 → 24
    episode = loader.load(spec)
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    assert torch.allclose(episode.query_images[0, :, 24:], black.expand(3, 16, 40))
    assert (episode.query_labels[0, 24:] == 255).all()  # padded labels are void
    assert (episode.query_labels[0, :24] != 255).any()
    assert not episode.support_fg[0, 0, 24:].any()
    assert not episode.support_bg[0, 0, 24:].any()  # padding is not support background
    assert episode.support_bg[0, 0, :24].any()
    square = EpisodeLoader(dataset, 40).load(spec)
    assert square.support_bg[0, 0, 24:].any()  # (the stretched input has no padding)
