import pytest
import torch
import torch.nn.functional as F

from fsbench.core import FsbenchError
from fsbench.datasets.episodes import Episode
from fsbench.methods import METHODS
from fsbench.methods.layers import VGG16Encoder, cosine_scores, masked_average_pool
from fsbench.methods.panet import PANet


def make_episode(way=1, shot=1, size=32, queries=1, seed=0, base_labels=False):
    """A random episode; with `base_labels`, the queries' labels over 15 training classes (what
    a base_class_labels method trains on)."""
    generator = torch.Generator().manual_seed(seed)
    fg = (torch.rand(way, shot, size, size, generator=generator) > 0.6).float()
    labels = torch.randint(0, way + 1, (queries, size, size), generator=generator)
    labels[:, :2] = 255
    return Episode(
        class_ids=list(range(1, way + 1)),
        support_images=torch.randn(way, shot, 3, size, size, generator=generator),
        support_fg=fg,
        support_bg=1 - fg,
        query_images=torch.randn(queries, 3, size, size, generator=generator),
        query_labels=labels,
        query_base_labels=torch.where(labels == 255, 255, labels * 3) if base_labels else None,
        base_class_ids=list(range(1, 16)) if base_labels else [],
    )


@pytest.mark.parametrize("name", METHODS.list("test_*"))
def test_every_test_method_runs_an_episode(name):
    torch.manual_seed(0)
    model = METHODS.get(name)()
    # a base learner trains on batches of images (its BatchNorm needs two in train mode); the
    # PFENet lineage's training input fits (S − 1) % 8 == 0
    base = model.base_class_labels
    queries, size = (2, 33) if base else (1, 32)
    if type(model).input_size_problem(size):  # Matcher: a multiple of 14
        size = 28
    episode = make_episode(shot=2 if base else 1, size=size, queries=queries, base_labels=base)
    output = model(episode)
    if model.output_kind == "labels":  # HSNet: episode indices
        assert output.shape == (1, size, size) and output.dtype == torch.long
        assert set(output.unique().tolist()) <= {0, 1}
    else:
        assert output.shape == (queries, 2, size, size) and torch.isfinite(output).all()
    if model.trainable:
        loss = model.loss(episode)["total"]
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    else:
        with pytest.raises(FsbenchError, match="not trained"):
            model.loss(episode)


def test_encoder_geometry_matches_panet():
    encoder = VGG16Encoder(width=1 / 16)
    assert encoder(torch.zeros(1, 3, 417, 417)).shape == (1, 32, 53, 53)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in encoder.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 13 and [c.dilation[0] for c in convs[-3:]] == [2, 2, 2]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3 + [(3, 1)]
    assert not isinstance(list(encoder.features)[-1], torch.nn.ReLU)  # no ReLU after conv5_3


def test_masked_average_pool_hand_values_and_adjoint_equals_naive():
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # 1x1x2x2, same size as the mask
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert masked_average_pool(features, mask).item() == pytest.approx(4.0, abs=1e-4)
    features = torch.randn(3, 5, 7, 9)
    masks = (torch.rand(3, 50, 61) > 0.5).float()
    up = F.interpolate(features, size=(50, 61), mode="bilinear", align_corners=False)
    naive = (up * masks[:, None]).sum((2, 3)) / (masks.sum((1, 2))[:, None] + 1e-5)
    assert torch.allclose(masked_average_pool(features, masks), naive, atol=1e-5)


def test_prototypes_background_mean_and_cosine_alpha():
    # way 2, shot 2, C 2, 1x1 features: pooling a 1x1 map with a full mask gives the feature.
    support = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 4.0]]])[..., None, None]
    fg = torch.ones(2, 2, 1, 1)
    fg_protos, bg_proto = PANet.prototypes(support, fg, fg)
    assert torch.allclose(fg_protos, torch.tensor([[2.0, 0.0], [0.0, 3.0]]), atol=1e-4)
    assert torch.allclose(bg_proto, torch.tensor([1.0, 1.5]), atol=1e-4)
    query = torch.tensor([1.0, 1.0])[None, :, None, None]
    scores = cosine_scores(query, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), alpha=20)
    assert torch.allclose(scores.flatten(), torch.tensor([20 / 2**0.5, 20.0]), atol=1e-4)


def test_par_loss_no_gradient_through_argmax_and_skips_missing_classes():
    model = PANet(alpha=20, par_weight=1, width=1 / 16)
    query = torch.randn(1, 4, 3, 3, requires_grad=True)
    support = torch.randn(2, 1, 4, 3, 3)
    fg = torch.zeros(2, 1, 6, 6)
    fg[0, 0, :3] = 1
    bg = 1 - fg
    scores = torch.zeros(1, 3, 3, 3, requires_grad=True)
    with torch.no_grad():
        scores[:, 0] = 1.0  # query prediction is background everywhere: both classes skipped
    assert model.alignment_loss(query, scores, support, fg, bg).item() == 0.0
    scores2 = torch.zeros(1, 3, 3, 3)
    scores2[0, 1, 0, 0] = 5.0  # class 1 predicted at one location; class 2 absent → skipped
    scores2 = scores2.requires_grad_()
    loss = model.alignment_loss(query, scores2, support, fg, bg)
    loss.backward()
    assert loss.item() > 0
    assert query.grad is not None and query.grad.abs().sum() > 0  # features carry gradient
    assert scores2.grad is None  # the argmax mask does not


def test_par_loss_equals_hand_computation_one_way():
    torch.manual_seed(1)
    model = PANet(alpha=20, par_weight=1, width=1 / 16)
    query, support = torch.randn(1, 4, 2, 2), torch.randn(1, 2, 4, 2, 2)
    fg = torch.zeros(1, 2, 4, 4)
    fg[0, :, :2] = 1
    bg = 1 - fg
    scores = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]]])
    # query prototypes at feature resolution: bg = pixel (0,0); fg = mean of the other three
    protos = torch.stack([query[0, :, 0, 0], query[0].flatten(1)[:, 1:].mean(1)])
    expected = 0
    for shot in range(2):
        logits = F.interpolate(
            cosine_scores(support[0, shot : shot + 1], protos, 20),
            size=(4, 4),
            mode="bilinear",
            align_corners=False,
        )
        expected += F.cross_entropy(logits, fg[0, shot : shot + 1].long()) / 2
    loss = model.alignment_loss(query, scores, support, fg, bg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.slow
def test_pretrained_torchvision_vgg16_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(reference, path)
    encoder = VGG16Encoder(pretrained=str(path))
    ours = list(encoder.state_dict().values())
    theirs = [v for k, v in reference.items() if k.startswith("features")]
    assert len(ours) == 26 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    bn = tmp_path / "vgg16_bn.pth"
    torch.save(torchvision.models.vgg16_bn(weights=None).state_dict(), bn)
    with pytest.raises(FsbenchError, match="vgg16_bn"):
        VGG16Encoder(pretrained=str(bn))
    with pytest.raises(FsbenchError, match="not found"):
        VGG16Encoder(pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(FsbenchError, match="width=1"):
        VGG16Encoder(width=0.5, pretrained=str(path))


def test_nway_kshot_shapes():
    torch.manual_seed(0)
    model = METHODS.get("test_panet")()
    episode = make_episode(way=3, shot=2, queries=3)
    assert model(episode).shape == (3, 4, 32, 32)
    assert torch.isfinite(model.loss(episode)["total"])
