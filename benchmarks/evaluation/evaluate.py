"""Evaluation on fixed manifests, planned from them: one dispatch on what the method declares
(`FewShotMethod.evaluation_path()`): every distinct image encoded once per model where the
method allows, episodes scored in batches, support states computed once per support."""

from __future__ import annotations

import sys
import time

import torch

from fsbench.benchmarks.evaluation.cache import FeatureCache, distinct_images
from fsbench.benchmarks.evaluation.evaluator import EpisodeCounter, QueryRef
from fsbench.datasets.episodes import EpisodeLoader

# Feature bytes of one chunk of episodes gathered at once (supports + queries).
CHUNK_BYTES = 256 << 20
MAX_CHUNK = 64


def _chunk_size(manifest, feature_bytes: int | None) -> int:
    """Episodes per batch: as many as keep their gathered features under CHUNK_BYTES."""
    if not manifest.episodes or not feature_bytes:
        return 16
    first = manifest.episodes[0]
    per_episode = (sum(len(s) for s in first.support) + len(first.query)) * feature_bytes
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // max(per_episode, 1))))


def _refs(start: int, specs, queries: int) -> list[QueryRef]:
    return [
        QueryRef(start + offset, spec, q)
        for offset, spec in enumerate(specs)
        for q in range(queries)
    ]


@torch.no_grad()
def evaluate(
    model,
    loader: EpisodeLoader,
    manifest,
    protocol,
    device="cpu",
    cache=None,
    chunk=None,
    keep_predictions: int = 0,
    evaluators=(),
):
    """Per-episode counts of `model` on every episode of `manifest`, plus timing.

    With `cache` (a FeatureCache of this model) and a method whose encoder is cacheable, the
    encoder runs once per distinct image and episodes are predicted in batches from cached
    features and masks (images are never loaded); otherwise each episode runs `model(episode)`.
    The first query of the first `keep_predictions` episodes is returned too; `evaluators`
    (plugin `Evaluator`s) are fed the same batches.
    """
    model.to(device).eval()
    started = time.perf_counter()
    counter = EpisodeCounter(loader, manifest, protocol, keep_predictions, model.output_kind)
    for extra in evaluators:
        extra.reset()
    use_cache = cache is not None and model.evaluation_path() != "episode"
    if not use_cache:
        model.begin_episodes()  # the episodes follow, in the manifest's order
    if chunk is None:
        chunk = _chunk_size(manifest, cache.feature_bytes) if use_cache else 1
    for start in range(0, len(manifest.episodes), chunk):
        specs = manifest.episodes[start : start + chunk]
        if use_cache:
            masks = [loader.load_masks(spec) for spec in specs]
            support_fg = torch.stack([m[0] for m in masks]).to(device)
            support_bg = torch.stack([m[1] for m in masks]).to(device)
            labels = torch.stack([m[2] for m in masks]).to(device)  # [B, Q, S, S]
            way, shot = support_fg.shape[1:3]
            support = cache.get([i for s in specs for ids in s.support for i in ids])
            query = cache.get([i for s in specs for i in s.query])
            outputs = model.predict_cached(
                support.unflatten(0, (len(specs), way, shot)),
                support_fg,
                support_bg,
                query.unflatten(0, (len(specs), -1)),
                labels.shape[-2:],
            )  # [B, Q, …]
        else:
            episodes = [loader.load(spec).to(device) for spec in specs]
            outputs = torch.stack([model(e) for e in episodes])
            labels = torch.stack([e.query_labels for e in episodes])
        refs = _refs(start, specs, outputs.shape[1])
        for consumer in (counter, *evaluators):
            consumer.process(outputs.flatten(0, 1), labels.flatten(0, 1), refs)
    counts, kept = counter.result()
    return counts, time.perf_counter() - started, kept


@torch.no_grad()
def evaluate_states(
    model, cache: FeatureCache, jobs, device="cpu", keep_predictions=0, evaluators=None
):
    """Evaluate `jobs` [(loader, manifest, protocol)] of one `support_states` method, in two
    passes over the distinct images, each image encoded once:

    1. every support image is encoded and turned into its support state, once per (image,
       class set, index, annotation); its encodings are kept (in memory up to the cache's
       budget, then spilled) only if it is also a query;
    2. every query image is encoded (or read back once) and scored against the support states
       of all the episodes it is the query of, in every job.

    Memory is the states plus the kept encodings' budget, whatever the pool size. Returns
    [(counts, seconds, kept)] per job (the time split evenly: the work is shared); `evaluators`
    (a list per job) are fed every batch too.
    """
    evaluators = evaluators or [[] for _ in jobs]
    for extra in (e for job_evaluators in evaluators for e in job_evaluators):
        extra.reset()
    started = time.perf_counter()
    model.to(device).eval()
    counters = [
        EpisodeCounter(loader, m, p, keep_predictions, model.output_kind) for loader, m, p in jobs
    ]
    pooling, answers = _state_plan(jobs)
    states: dict = {}
    for ids, features in cache.batches(list(pooling), keep=answers.__contains__):
        for image, feature in zip(ids, features):
            encodings = model.unpack(feature[None])
            for key, (loader, index, classes) in pooling[image].items():
                fg, bg = loader.support_masks(image, index, list(classes))
                # One support at a time: its state never depends on what else is pooled.
                states[key] = model.support_state(
                    encodings, fg[None].to(device).float(), bg[None].to(device).float()
                )[0]
    for ids, features in cache.batches(list(answers), keep=lambda _: False):
        for image, feature in zip(ids, features):
            by_job: dict[int, list] = {}
            for job, ref in answers[image]:
                by_job.setdefault(job, []).append(ref)
            for job, refs in by_job.items():
                loader = jobs[job][0]
                episode_states = torch.stack(
                    [_episode_states(states, loader, ref.spec) for ref in refs]
                )  # [R, N, K, …]
                labels = torch.stack(
                    [loader.query_label(image, list(ref.spec.classes)) for ref in refs]
                ).to(device)
                outputs = model.predict_states(
                    model.unpack(feature[None]), episode_states[None], labels.shape[-2:]
                )
                for consumer in (counters[job], *evaluators[job]):
                    consumer.process(outputs[0], labels, refs)
    seconds = (time.perf_counter() - started) / max(len(jobs), 1)
    return [(counts, seconds, kept) for counts, kept in (c.result() for c in counters)]


def _state_plan(jobs):
    """Which support states each image provides ({image: {key: (loader, index, classes)}}) and
    which queries it answers ({image: [(job, QueryRef)]})."""
    pooling: dict[str, dict] = {}
    answers: dict[str, list] = {}
    for job, (loader, manifest, _) in enumerate(jobs):
        for episode, spec in enumerate(manifest.episodes):
            for index, ids in enumerate(spec.support):
                for image in ids:
                    key = loader.support_key(image, index, spec.classes)
                    pooling.setdefault(image, {})[key] = (loader, index, spec.classes)
            for q, image in enumerate(spec.query):
                answers.setdefault(image, []).append((job, QueryRef(episode, spec, q)))
    return pooling, answers


def _episode_states(states: dict, loader, spec) -> torch.Tensor:
    """The support states [N, K, …] of one episode."""
    return torch.stack(
        [
            torch.stack([states[loader.support_key(i, index, spec.classes)] for i in ids])
            for index, ids in enumerate(spec.support)
        ]
    )


def evaluate_model(
    model, cache: FeatureCache, jobs, device="cpu", keep_predictions=0, evaluators=None
):
    """[(counts, seconds, kept)] of each job [(loader, manifest, protocol)] of one model, on the
    path its class declares; when the plan's encodings cannot fit the cache's memory and disk
    budgets, episode by episode instead (said in one line). `evaluators` (a list per job) are
    fed the same batches on whichever path runs."""
    evaluators = evaluators or [[] for _ in jobs]
    path = model.evaluation_path()
    manifests = [manifest for _, manifest, _ in jobs]
    images = distinct_images(manifests)
    if path != "episode" and images:
        cache.prefetch(images[:1])  # the size of one image's encodings
        if path == "support_states":
            queries = {i for m in manifests for spec in m.episodes for i in spec.query}
            supports = {
                i for m in manifests for spec in m.episodes for s in spec.support for i in s
            }
            stored = len(queries & supports)
        else:
            stored = len(images)
        if not cache.plan_fits(stored):
            print(
                f"fsbench: {type(model).__name__}: {stored} images × "
                f"{cache.feature_bytes / 2**20:.1f} MiB of encodings exceed cache_bytes "
                f"({cache.max_bytes / 2**30:.1f} GiB) + spill_bytes "
                f"({cache.spill_bytes / 2**30:.1f} GiB): evaluating episode by episode",
                file=sys.stderr,
            )
            path = "episode"
    if path == "support_states":
        return evaluate_states(model, cache, jobs, device, keep_predictions, evaluators)
    started = time.perf_counter()
    if path == "features":
        cache.prefetch(images)
    shared = (time.perf_counter() - started) / max(len(jobs), 1)
    cached = cache if path == "features" else None
    results = [
        evaluate(model, *job, device, cached, keep_predictions=keep_predictions, evaluators=extra)
        for job, extra in zip(jobs, evaluators)
    ]
    return [(counts, seconds + shared, kept) for counts, seconds, kept in results]
