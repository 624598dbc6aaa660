"""SG-One, CANet and the fine-tuning baseline: their distinctive computations on hand-made
tensors, and the evaluator's cached-encoder path being exact for each."""

import numpy as np
import pytest
import torch

from fsbench.benchmarks.evaluation.cache import FeatureCache
from fsbench.benchmarks.evaluation.evaluate import evaluate
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import get_protocol
from fsbench.methods import METHODS
from fsbench.methods.canet import CANet
from fsbench.methods.finetune import Finetune, LinearProbe
from fsbench.methods.sgone import SGOne


@pytest.mark.parametrize("name", ["test_sgone", "test_canet", "test_linear_probe", "test_finetune"])
def test_cached_encoder_path_is_exact(dataset, name):
    protocol = get_protocol("panet")
    torch.manual_seed(0)
    model = METHODS.get(name)().eval()
    manifest = EpisodeManifest.build(dataset, protocol, 0, 1, 2, 4, 3)
    loader = EpisodeLoader(dataset, 32)
    plain, _, _ = evaluate(model, loader, manifest, protocol)
    cached, _, _ = evaluate(
        model, loader, manifest, protocol, cache=FeatureCache(model, loader, "cpu")
    )
    assert np.array_equal(plain.per_class, cached.per_class)


def test_sgone_similarity_guidance_gates_the_segmentation_branch():
    torch.manual_seed(0)
    model = SGOne(width=1 / 16).eval()
    guidance = model.guidance.out_channels
    side = model.side5.out_channels
    support = torch.zeros(2, guidance + side, 4, 4)
    support[:, 0] = 1.0  # the masked support vector is e_0 (averaged over 2 shots)
    fg = torch.ones(2, 4, 4)
    query = torch.rand(1, guidance + side, 4, 4) + 0.1
    query[:, :guidance] = 0
    query[0, 0, 0, 0] = 1.0  # cosine 1 at (0, 0) …
    query[0, 1, 1:, :] = 1.0  # … and 0 (orthogonal guidance) on rows 1-3
    padded = model.binary_logits(support, fg, query)
    # the official exit conv's padding=1: a border of bias-only logits around the 4×4 map
    assert padded.shape == (1, 2, 6, 6)
    assert torch.allclose(padded[0, :, 0, 0], model.exit.bias)
    logits = padded[:, :, 1:-1, 1:-1]
    # where the similarity is 0 the branch input is 0: the 3×3 conv then sees zeros on rows 2-3
    row = logits[0, :, 3]
    assert torch.allclose(row, row[:, :1].expand_as(row), atol=1e-6)
    assert not torch.allclose(logits[0, :, 0, 0], logits[0, :, 3, 3])


def test_canet_attention_fuses_shots_and_iom_uses_history():
    torch.manual_seed(0)
    model = CANet(blocks=(1, 1, 1), channels=8, iterations=3).eval()
    for module in model.modules():  # the official N(0, 0.01) init nearly zeroes 8-wide maps
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    support = torch.randn(1, 8, 5, 5)
    fg = (torch.rand(1, 5, 5) > 0.5).float()
    query = torch.randn(2, 8, 5, 5)
    single = model.comparison(support, fg, query)
    repeated = model.comparison(support.expand(3, -1, -1, -1), fg.expand(3, -1, -1), query)
    assert torch.allclose(single, repeated, atol=1e-5)  # equal shots: weights 1/3 each
    outputs = model.binary_logits(support, fg, query, iterations=3)
    assert len(outputs) == 3 and not torch.allclose(outputs[0], outputs[1])
    zero = model.refine(single, torch.zeros(2, 2, 5, 5))
    assert torch.allclose(zero, outputs[0])  # the first step sees an empty history


def test_linear_probe_fits_a_separable_support_and_predicts_the_query():
    model = LinearProbe(width=1 / 16, steps=60, lr=0.5)
    features = torch.zeros(1, 1, 2, 4, 4)
    features[0, 0, 0, :, :2] = 1.0  # foreground pixels along channel 0
    features[0, 0, 1, :, 2:] = 1.0  # background along channel 1
    fg = torch.zeros(1, 1, 8, 8)
    fg[..., :4] = 1.0
    query = torch.zeros(1, 2, 4, 4)
    query[0, 0, :2] = 1.0
    query[0, 1, 2:] = 1.0
    prediction = model.predict(features, fg, 1 - fg, query, (4, 4)).argmax(1)[0]
    assert prediction[:2].eq(1).all() and prediction[2:].eq(0).all()


def test_oslsm_finetune_adapts_its_trained_classifier_to_the_support():
    """A classifier that calls everything background is fine-tuned on one support into one that
    separates the support's foreground feature, and the query follows; zero steps keep it."""
    model = Finetune(width=1 / 16, steps=80, lr=0.5)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    channels = model.encoder.out_channels
    features = torch.zeros(1, 1, channels, 4, 4)
    features[0, 0, 0, :, :2] = 1.0
    features[0, 0, 1, :, 2:] = 1.0
    fg = torch.zeros(1, 1, 8, 8)
    fg[..., :4] = 1.0
    query = torch.zeros(1, channels, 4, 4)
    query[0, 0, :2] = 1.0
    query[0, 1, 2:] = 1.0
    prediction = model.predict(features, fg, 1 - fg, query, (4, 4)).argmax(1)[0]
    assert prediction[:2].eq(1).all() and prediction[2:].eq(0).all()
    model.steps = 0
    assert model.predict(features, fg, 1 - fg, query, (4, 4)).argmax(1).eq(0).all()


def test_oslsm_finetune_trains_on_base_class_queries(dataset):
    """Its base-class training is a binary segmentation loss on the query (supports unused)."""
    torch.manual_seed(0)
    model = METHODS.get("test_finetune")()
    manifest = EpisodeManifest.build(dataset, get_protocol("panet"), 0, 1, 1, 1, 3)
    episode = EpisodeLoader(dataset, 32).load(manifest.episodes[0])
    loss = model.loss(episode)["total"]
    loss.backward()
    assert loss.item() > 0 and model.classifier.weight.grad.abs().sum() > 0
    assert model.trainable and not METHODS.get("test_linear_probe")().trainable
