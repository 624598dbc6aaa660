"""The public conformance kit: the checks fsbench's own test suite runs on every registered
method, for a contributor to run on theirs before a grid does.

    check_method("my_method", width=0.25)      # a registered name, or the class itself

It builds the method at a size its `input_size_problem` accepts and checks, on generated 1-way
and 2-way, 1- and 5-shot episodes: the output's shape and kind, finite values, determinism,
every evaluation path the class declares equal to `forward` (the same per-episode counts, through
the engine's own evaluator and feature cache), `loss()` with a `total` whose gradients reach
exactly the parameters that train, `param_groups()` naming each parameter once, and the declared
training stages. A broken rule raises `AssertionError` naming the rule; a passing method returns
what was checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from fsbench.benchmarks.evaluation.cache import FeatureCache
from fsbench.benchmarks.evaluation.evaluate import evaluate, evaluate_model
from fsbench.benchmarks.grid.recipes import check_stages
from fsbench.datasets.episodes import Episode, EpisodeLoader
from fsbench.datasets.manifests import EpisodeManifest
from fsbench.datasets.pascal import Pascal5i
from fsbench.datasets.protocols import get_protocol
from fsbench.datasets.synthetic import write_voc
from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod

# The sizes tried, smallest first, until the method's input_size_problem accepts one (PFENet's
# rule is (S - 1) % 8 == 0: 33).
CANDIDATE_SIZES = (32, 33, 40, 41, 48, 49, 56, 57, 64, 65, 96, 97, 128, 129)
SETTINGS = ((1, 1), (1, 5), (2, 1), (2, 5))  # (way, shot)


def check_method(method, /, **kwargs) -> dict:
    """Run the conformance checks on `method` (a registered name or a FewShotMethod subclass)
    built with `kwargs`; returns {rule: what was checked}, raises AssertionError on a broken one."""

    name, cls, build = _resolve(method, kwargs)
    checked: dict[str, str] = {}

    def rule(title: str, ok: bool, detail: str = "") -> None:
        if not ok:
            raise AssertionError(f"check_method({name}): rule '{title}' is broken: {detail}")

    rule(
        "a FewShotMethod",
        isinstance(cls, type) and issubclass(cls, FewShotMethod),
        f"it builds {cls!r}; subclass fsbench.FewShotMethod",
    )
    size = next((s for s in CANDIDATE_SIZES if cls.input_size_problem(s) is None), None)
    rule("an input size that fits", size is not None, f"none of {CANDIDATE_SIZES} fits")
    checked["input size"] = f"{size} px"
    torch.manual_seed(0)
    model = build().eval()
    rule("builds its declared class", type(model) is cls, f"built a {type(model).__name__}")
    for way, shot in SETTINGS:
        episode = generated_episode(way, shot, size, seed=way * 10 + shot)
        with torch.no_grad():
            # each from the start of a run (`begin_episodes`: e.g. Matcher's prompt sampler)
            model.begin_episodes()
            first = model(episode)
            model.begin_episodes()
            second = model(episode)
        _check_output(rule, cls, first, way, size, f"{way}-way {shot}-shot")
        rule(
            "deterministic",
            torch.equal(first, second),
            f"{way}-way {shot}-shot: two forwards in eval mode differ",
        )
    checked["outputs"] = f"{cls.output_kind}, finite, deterministic on {len(SETTINGS)} settings"
    _check_param_groups(rule, model)
    checked["param_groups"] = "each parameter named once" if model.param_groups() else "one group"
    if cls.trainable:
        checked["loss"] = _check_loss(rule, build, size)
    else:
        checked["loss"] = "not trainable"
    checked["stages"] = _check_stages(rule, cls, model)
    checked["evaluation paths"] = _check_paths(rule, cls, build, size)
    return checked


def _resolve(method, kwargs):
    """(name, class, builder) of a registered name or a class."""

    if isinstance(method, str):
        builder = METHODS.get(method)
        declared = METHODS.provides(method)
        if declared is None:  # an unannotated builder: build once to learn the class
            declared = type(builder(**kwargs))
        return method, declared, lambda: METHODS.build(method, **kwargs)
    return getattr(method, "__name__", repr(method)), method, lambda: method(**kwargs)


def generated_episode(
    way: int, shot: int, size: int, seed: int = 0, queries: int = 1, base_labels: bool = False
):
    """A random `way`-way `shot`-shot episode at `size` px: noise images, blob masks with some
    ignored (255) query pixels; with `base_labels`, the query's labels over 15 training classes
    (those of base_class_labels methods)."""

    generator = torch.Generator().manual_seed(seed)
    fg = torch.zeros(way, shot, size, size)
    for index in range(way):  # a rectangle per class, placed at random
        for k in range(shot):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            fg[index, k, top : top + size // 3, left : left + size // 3] = 1
    bg = 1 - fg.amax(0, keepdim=True).expand_as(fg)
    labels = torch.randint(0, way + 1, (queries, size, size), generator=generator)
    labels[:, :2] = 255
    return Episode(
        class_ids=list(range(1, way + 1)),
        support_images=torch.randn(way, shot, 3, size, size, generator=generator),
        support_fg=fg,
        support_bg=bg.contiguous(),
        query_images=torch.randn(queries, 3, size, size, generator=generator),
        query_labels=labels,
        query_base_labels=(
            torch.where(labels == 255, 255, torch.randint(0, 16, labels.shape, generator=generator))
            if base_labels
            else None
        ),
        base_class_ids=list(range(1, 16)) if base_labels else [],
    )


def _check_output(rule, cls, output, way: int, size: int, where: str) -> None:

    if cls.output_kind == "labels":
        rule(
            "label output",
            output.shape == (1, size, size) and output.dtype == torch.long,
            f"{where}: expected labels [1, {size}, {size}] long, got {tuple(output.shape)} "
            f"{output.dtype}",
        )
        rule(
            "labels in 0…way",
            int(output.min()) >= 0 and int(output.max()) <= way,
            f"{where}: values outside 0…{way}",
        )
        return
    rule(
        "logit output",
        output.shape == (1, 1 + way, size, size) and output.is_floating_point(),
        f"{where}: expected logits [1, {1 + way}, {size}, {size}], got {tuple(output.shape)}",
    )
    rule("finite values", bool(torch.isfinite(output).all()), f"{where}: NaN or inf in the logits")


def _check_param_groups(rule, model) -> None:
    groups = model.param_groups()
    if not groups:
        return
    named = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group, parameters in groups.items():
        for parameter in parameters:
            rule(
                "param_groups names each parameter once",
                id(parameter) not in seen,
                f"{named.get(id(parameter), '?')} is in groups {seen.get(id(parameter))} and "
                f"{group}",
            )
            seen[id(parameter)] = group
    missing = [n for i, n in named.items() if i not in seen]
    rule(
        "param_groups covers every parameter",
        not missing,
        f"{len(missing)} parameter(s) in no group, e.g. {missing[:3]}",
    )


def _check_loss(rule, build, size: int) -> str:
    """`loss()` on a 1-way 1-shot and a 2-way 5-shot episode: a finite `total` each, whose
    backward passes together give a gradient to every parameter that trains (requires_grad) and
    none to the others (a k-shot fusion layer may see a gradient only on k-shot episodes)."""

    torch.manual_seed(0)
    model = build().train()
    for way, shot in ((1, 1), (2, 5)):
        base = type(model).base_class_labels  # a base learner's BatchNorm wants a batch of 2
        episode = generated_episode(
            way, shot, size, seed=100 + way, queries=2 if base else 1, base_labels=base
        )
        losses = model.loss(episode)
        rule(
            "loss() returns a dict with 'total'",
            isinstance(losses, dict) and "total" in losses,
            f"{way}-way {shot}-shot: got {type(losses).__name__}",
        )
        total = losses["total"]
        rule(
            "a finite scalar total",
            total.dim() == 0 and bool(torch.isfinite(total)),
            f"{way}-way {shot}-shot: total {total}",
        )
        total.backward()
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    frozen = [n for n, p in params.items() if not p.requires_grad]
    without = [n for n in trained if params[n].grad is None]
    rule(
        "gradients reach every parameter that trains",
        not without,
        f"{len(without)} of {len(trained)} trainable parameters got no gradient on 1-way 1-shot "
        f"and 2-way 5-shot episodes, e.g. {without[:3]} (freeze them: requires_grad_(False))",
    )
    leaked = [n for n in frozen if params[n].grad is not None]
    rule("no gradient on frozen parameters", not leaked, f"e.g. {leaked[:3]}")
    return f"total finite; gradients on the {len(trained)} trainable tensors, none on {len(frozen)}"


def _check_stages(rule, cls, model) -> str:
    """The class's `default_stages()`, when it declares them: named, each training groups the
    method names."""
    stages = cls.default_stages()
    if not stages:
        return "none declared"

    groups = set(model.param_groups()) | {"all"}
    try:
        check_stages(stages, groups, f"{cls.__name__}.default_stages()")
    except Exception as error:  # noqa: BLE001 - FsbenchError names the problem
        rule("valid default stages", False, str(error))
    return ", ".join(f"{s['name']} ({s.get('steps', '?')} steps)" for s in stages)


def _check_paths(rule, cls, build, size: int) -> str:
    """Every declared evaluation path gives the per-episode counts of `forward`, through the
    engine's evaluator and feature cache, on a generated dataset in the VOC layout."""

    path = cls.evaluation_path()
    if path == "episode":
        return "episode (forward only)"
    protocol = get_protocol("panet")
    with tempfile.TemporaryDirectory(prefix="fsbench-check-") as folder:
        write_voc(Path(folder), 200, max(size, 32), seed=5)
        dataset = Pascal5i(Path(folder), cache_dir=Path(folder) / "index")
        loader = EpisodeLoader(dataset, size)
        torch.manual_seed(0)
        model = build().eval()
        for way, shot in SETTINGS:
            manifest = EpisodeManifest.build(
                dataset, protocol, 0, way, shot, 3, 7, sampler="fsbench"
            )
            plain, _, _ = evaluate(model, loader, manifest, protocol)
            cache = FeatureCache(model, loader, "cpu", batch_size=4, spill_bytes=0)
            ((cached, _, _),) = evaluate_model(model, cache, [(loader, manifest, protocol)])
            rule(
                f"the {path} path equals forward",
                np.array_equal(plain.per_class, cached.per_class)
                and np.array_equal(plain.foreground, cached.foreground),
                f"{way}-way {shot}-shot: per-episode counts differ from model(episode)'s",
            )
    return f"{path} = forward on {len(SETTINGS)} settings"
