"""A plugin method shaped like BAM/HDMNet: a base learner (a per-pixel classifier over the fold's
training classes) trained first on image batches with base-class labels, then a meta learner
trained on episodes while the base learner is frozen; the prediction ensembles both. One file,
named by a grid's `imports:`; it declares what it needs from the engine (stages, base labels)."""

import torch
import torch.nn.functional as F

from fsbench import register_method
from fsbench.methods.base import FewShotMethod
from fsbench.methods.layers import masked_average_pool


class TwoStage(FewShotMethod):
    base_class_labels = True
    version = "1"

    def __init__(self, base_classes=15, channels=8):
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.base = torch.nn.Conv2d(channels, 1 + base_classes, 1)  # background + B classes
        self.meta = torch.nn.Conv2d(channels, channels, 1)
        self.seen: list[tuple[str, str, bool, bool]] = []  # (stage, input, base/meta train)

    @classmethod
    def default_stages(cls):
        return (
            {"name": "base", "steps": 3, "params": ["base"], "sampler": "images", "lr": 0.05},
            {"name": "meta", "steps": 4, "params": ["meta"]},
        )

    def param_groups(self):
        return {"base": [*self.encoder.parameters(), *self.base.parameters()],
                "meta": list(self.meta.parameters())}  # fmt: skip

    def _note(self, kind):
        trains = (self.base.weight.requires_grad, self.meta.weight.requires_grad)
        self.seen.append((self.stage, kind, *trains))

    def loss_images(self, batch):
        self._note("images")
        logits = self.base(self.encoder(batch.images))
        logits = F.interpolate(logits, batch.labels.shape[-2:], mode="bilinear")
        return {"total": F.cross_entropy(logits, batch.labels, ignore_index=255)}

    def forward(self, episode):
        way, shot = episode.support_fg.shape[:2]
        support = self.meta(self.encoder(episode.support_images.flatten(0, 1)))
        query = self.meta(self.encoder(episode.query_images))
        fg = masked_average_pool(support, episode.support_fg.flatten(0, 1))
        bg = masked_average_pool(support, episode.support_bg.flatten(0, 1)).mean(0, keepdim=True)
        prototypes = torch.cat([bg, fg.view(way, shot, -1).mean(1)])
        scores = torch.einsum(
            "qchw,nc->qnhw", F.normalize(query, dim=1), F.normalize(prototypes, dim=1)
        )
        base = self.base(self.encoder(episode.query_images)).softmax(1)
        scores = (
            10 * scores
            + torch.cat(  # the ensemble: base learner's background confidence
                [base[:, :1], torch.zeros_like(scores[:, 1:])], 1
            )
        )
        return F.interpolate(scores, episode.query_images.shape[-2:], mode="bilinear")

    def init_from(self, model):
        """Take over a trained base learner (a grid's `init_from:`)."""
        self.encoder.load_state_dict(model.encoder.state_dict())
        self.base.load_state_dict(model.base.state_dict())

    def loss(self, episode):
        self._note("episode")
        assert episode.query_base_labels is not None  # base_class_labels = True
        logits = self.forward(episode)
        return {"total": F.cross_entropy(logits, episode.query_labels, ignore_index=255)}


class BaseLearner(TwoStage):
    """The base learner alone (a PSPNet-like per-pixel classifier over the training classes),
    trained on image batches only; scored as a few-shot method by its feature prototypes."""

    version = None

    @classmethod
    def default_stages(cls):
        return ({"name": "base", "steps": 3, "params": ["base"], "sampler": "images", "lr": 0.05},)

    def param_groups(self):
        return {"base": [*self.encoder.parameters(), *self.base.parameters()],
                "unused": list(self.meta.parameters())}  # fmt: skip

    def forward(self, episode):
        way, shot = episode.support_fg.shape[:2]
        support = self.encoder(episode.support_images.flatten(0, 1))
        query = self.encoder(episode.query_images)
        fg = masked_average_pool(support, episode.support_fg.flatten(0, 1))
        bg = masked_average_pool(support, episode.support_bg.flatten(0, 1)).mean(0, keepdim=True)
        prototypes = torch.cat([bg, fg.view(way, shot, -1).mean(1)])
        scores = torch.einsum(
            "qchw,nc->qnhw", F.normalize(query, dim=1), F.normalize(prototypes, dim=1)
        )
        return F.interpolate(10 * scores, episode.query_images.shape[-2:], mode="bilinear")


@register_method()
def base_learner(**kwargs) -> BaseLearner:
    return BaseLearner(**kwargs)


@register_method(display="Two-stage (test)", aliases=["two_stage_old"])
def two_stage(**kwargs) -> TwoStage:
    return TwoStage(**kwargs)
