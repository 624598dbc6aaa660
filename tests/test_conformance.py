"""The public conformance kit (`fsbench.testing.check_method`): every registered method passes
it, and each of its rules fails on a method that breaks that rule, naming the rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod
from fsbench.testing import check_method


@pytest.mark.parametrize("name", ["test_panet", "test_all_background", "test_pfenet"])
def test_small_variants_pass_the_kit(name):
    checked = check_method(name)
    assert checked["outputs"].startswith(METHODS.provides(name).output_kind)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in METHODS.list() if not n.startswith("test_")])
def test_every_registered_method_passes_the_kit(name):
    # the foundation-model methods at their tests' size (random weights: no official file here)
    from small_methods import SMALL_KWARGS

    checked = check_method(name, **SMALL_KWARGS.get(name, {}))
    path = METHODS.provides(name).evaluation_path()
    assert checked["evaluation paths"].startswith(path)


class Prototype(FewShotMethod):
    """A small, conforming method: masked-average prototypes of a 1×1 conv, cosine scores."""

    cacheable_encoder = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def encode(self, images):
        return self.conv(images)

    def predict(self, support, fg, bg, query, size):
        def pool(features, mask):
            return (features * mask[:, None]).sum((-2, -1)) / (mask.sum((-2, -1))[:, None] + 1e-5)

        way, shot = fg.shape[:2]
        flat = support.flatten(0, 1)
        fg_protos = pool(flat, fg.flatten(0, 1)).view(way, shot, -1).mean(1)
        bg_proto = pool(flat, bg.flatten(0, 1)).mean(0, keepdim=True)
        protos = torch.cat([bg_proto, fg_protos])
        scores = torch.einsum("qchw,nc->qnhw", nn.functional.normalize(query, dim=1),
                              nn.functional.normalize(protos, dim=1))  # fmt: skip
        return 10 * scores

    def forward(self, episode):
        support, query = self.encode_episode(episode)
        return self.predict(
            support, episode.support_fg, episode.support_bg, query, episode.query_images.shape[-2:]
        )

    def loss(self, episode):
        logits = self.forward(episode)
        return {
            "total": nn.functional.cross_entropy(logits, episode.query_labels, ignore_index=255)
        }


def test_a_conforming_plugin_class_passes():
    checked = check_method(Prototype)
    assert checked["evaluation paths"] == "features = forward on 4 settings"


class Noisy(Prototype):
    def forward(self, episode):
        return super().forward(episode) + torch.rand(1)


class NotFinite(Prototype):
    def forward(self, episode):
        return super().forward(episode) / 0


class WrongShape(Prototype):
    def forward(self, episode):
        return super().forward(episode)[:, :1]


class CacheDiffers(Prototype):
    def forward(self, episode):  # the cached path (encode + predict) gives the opposite
        return -super().forward(episode)


class TwiceGrouped(Prototype):
    def param_groups(self):
        return {"a": [self.conv.weight, self.conv.bias], "b": [self.conv.bias]}


class Ungrouped(Prototype):
    def __init__(self):
        super().__init__()
        self.extra = nn.Conv2d(4, 4, 1)

    def param_groups(self):
        return {"conv": list(self.conv.parameters())}


class Unused(Prototype):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(2, 2)  # trains, but no loss reaches it


class BadStages(Prototype):
    @classmethod
    def default_stages(cls):
        return ({"name": "base", "steps": 10, "params": ["nope"]},)


@pytest.mark.parametrize(
    "broken, rule",
    [
        (Noisy, "deterministic"),
        (NotFinite, "finite values"),
        (WrongShape, "logit output"),
        (CacheDiffers, "the features path equals forward"),
        (TwiceGrouped, "param_groups names each parameter once"),
        (Ungrouped, "param_groups covers every parameter"),
        (Unused, "gradients reach every parameter that trains"),
        (BadStages, "valid default stages"),
    ],
)
def test_each_rule_fails_on_a_method_that_breaks_it(broken, rule):
    with pytest.raises(AssertionError, match=f"rule '{rule}' is broken"):
        check_method(broken)
