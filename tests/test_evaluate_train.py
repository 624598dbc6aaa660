import dataclasses
import time

import numpy as np
import pytest
import torch

from fsbench.benchmarks.evaluation.cache import FeatureCache
from fsbench.benchmarks.evaluation.evaluate import evaluate, evaluate_states
from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.train import split_validation_classes, train
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import get_protocol
from fsbench.methods import METHODS
from fsbench.methods.base import FewShotMethod

PANET = get_protocol("panet")


@pytest.mark.parametrize("way, shot", [(1, 1), (1, 3), (2, 1)])
def test_cached_features_give_identical_metrics(dataset, way, shot):
    # The cached path predicts chunks of episodes in one batch, from masks only; the plain path
    # runs model(episode) one episode at a time on loaded images: the counts must be equal.
    torch.manual_seed(0)
    model = METHODS.get("test_panet")()
    manifest = EpisodeManifest.build(dataset, PANET, 0, way, shot, 12, 5)
    loader = EpisodeLoader(dataset, 32)
    plain, _, _ = evaluate(model, loader, manifest, PANET)
    cache = FeatureCache(model, loader, "cpu", batch_size=4)
    cached, _, _ = evaluate(model, loader, manifest, PANET, cache=cache)
    assert np.array_equal(plain.per_class, cached.per_class)
    assert np.array_equal(plain.foreground, cached.foreground)
    distinct = {i for e in manifest.episodes for i in (*sum(e.support, ()), *e.query)}
    assert cache.encoded == len(distinct)  # each distinct image encoded exactly once
    again, _, _ = evaluate(model, loader, manifest, PANET, cache=cache)  # another seed/shot reuse
    assert cache.encoded == len(distinct) and again.miou() == cached.miou()


def test_prototype_plan_equals_per_episode_evaluation_and_encodes_each_image_once(dataset):
    # Supports pooled once per (image, classes, index, annotation), queries scored in image order,
    # over several jobs at once (seeds, shots, ways, a scribble annotation): every job's counts
    # equal its own per-episode run's, and each distinct image goes through the encoder once,
    # under a budget that holds two maps (the rest spilled and read back once).
    torch.manual_seed(0)
    model = METHODS.get("test_panet")().eval()
    loader = EpisodeLoader(dataset, 32)
    manifests = [
        EpisodeManifest.build(dataset, PANET, 0, 1, 1, 10, 1),
        EpisodeManifest.build(dataset, PANET, 0, 1, 3, 10, 2),
        EpisodeManifest.build(dataset, PANET, 0, 2, 1, 8, 3),
    ]
    jobs = [(loader, m, PANET) for m in manifests]
    jobs.append((loader.annotated("scribble", weak_seed=4), manifests[0], PANET))
    one_map = 32 * 4 * 4 * 4
    cache = FeatureCache(model, loader, "cpu", max_bytes=2 * one_map, batch_size=4)
    results = evaluate_states(model, cache, jobs, keep_predictions=2)
    for (job_loader, manifest, _), (counts, _, kept) in zip(jobs, results):
        plain, _, plain_kept = evaluate(model, job_loader, manifest, PANET, keep_predictions=2)
        assert np.array_equal(counts.per_class, plain.per_class)
        assert np.array_equal(counts.background, plain.background)
        assert [k["episode"] for k in kept] == [0, 1]
        assert all(torch.equal(a["prediction"], b["prediction"]) for a, b in zip(kept, plain_kept))
    distinct = {i for m in manifests for e in m.episodes for i in (*sum(e.support, ()), *e.query)}
    assert cache.encoded == len(distinct)
    assert cache.spilled > 0 and len(cache._items) <= 2
    # A job's counts do not depend on which other jobs shared the plan.
    alone = FeatureCache(model, loader, "cpu", batch_size=4)
    ((counts, _, _),) = evaluate_states(model, alone, jobs[2:3])
    assert np.array_equal(counts.per_class, results[2][0].per_class)


def test_cached_features_do_not_depend_on_what_was_cached_before(dataset):
    # Ray evaluates each seed in its own task, the serial runner shares one cache across seeds: an
    # image must get bit-identical features whichever images shared its encoder batch.
    torch.manual_seed(0)
    model = METHODS.get("test_panet")().eval()
    loader = EpisodeLoader(dataset, 32)
    ids = dataset.class_images("val", 1)[:7]
    cold = FeatureCache(model, loader, "cpu", batch_size=8)
    cold.prefetch(ids)
    warm = FeatureCache(model, loader, "cpu", batch_size=8)
    warm.prefetch(ids[:1])
    warm.prefetch(ids[3:5])
    warm.prefetch(ids)  # the other four in a batch of their own
    assert warm.encoded == cold.encoded == len(ids)
    for image_id in ids:
        assert torch.equal(cold.get([image_id]), warm.get([image_id])), image_id


def test_cache_bound_spills_but_stays_exact_and_never_reencodes(dataset):
    torch.manual_seed(0)
    model = METHODS.get("test_panet")()
    manifest = EpisodeManifest.build(dataset, PANET, 1, 1, 2, 10, 9)
    loader = EpisodeLoader(dataset, 32)
    tiny = FeatureCache(model, loader, "cpu", max_bytes=3 * 32 * 4 * 4 * 4, batch_size=2)
    bounded, _, _ = evaluate(model, loader, manifest, PANET, cache=tiny, chunk=3)
    plain, _, _ = evaluate(model, loader, manifest, PANET)
    assert np.array_equal(bounded.per_class, plain.per_class)
    distinct = {i for e in manifest.episodes for i in (*sum(e.support, ()), *e.query)}
    assert len(tiny._items) <= 3 and tiny.spilled == len(distinct) - len(tiny._items)
    assert tiny.encoded == len(distinct)  # the bound costs no re-encode


def test_multi_id_get_on_a_cache_at_capacity(dataset):
    # Regression: an LRU cache evicted, while encoding the missing ids of one get, ids that the
    # same get was about to read (KeyError in 5-shot and N-way evaluation at real pool sizes).
    torch.manual_seed(0)
    model = METHODS.get("test_panet")().eval()
    loader = EpisodeLoader(dataset, 32)
    ids = dataset.class_images("val", 2)[:6]
    one_map = 32 * 4 * 4 * 4
    full = FeatureCache(model, loader, "cpu", max_bytes=2 * one_map, batch_size=2)
    full.get(ids[:2])  # at capacity
    features = full.get(ids)  # four more ids in one get
    reference = FeatureCache(model, loader, "cpu", batch_size=2)
    for image_id, feature in zip(ids, features):
        assert torch.equal(feature, reference.get([image_id])[0]), image_id
    assert full.encoded == len(ids)


def test_original_resolution_scoring(dataset):
    # PFENet's switches, minus its 2·32·32-pixel object filter (the test images are tiny).
    protocol = dataclasses.replace(get_protocol("pfenet"), min_object_pixels=1)
    torch.manual_seed(0)
    model = METHODS.get("test_all_foreground")()
    manifest = EpisodeManifest.build(dataset, protocol, 0, 1, 1, 4, 1)
    counts, _, _ = evaluate(model, EpisodeLoader(dataset, 32), manifest, protocol)
    query = manifest.episodes[0].query[0]
    label = dataset.load_label(query)  # 48x64 original, not 32x32
    valid = (label != 255).sum()
    assert counts.per_class[0].sum() == valid  # every valid original pixel is scored


def test_training_is_deterministic_and_learns(dataset):
    cfg = TrainConfig(steps=12, lr=1e-2, lr_milestones=(8,), log_every=4, seed=3)
    states = []
    for _ in range(2):
        torch.manual_seed(cfg.seed)
        model = METHODS.get("test_panet")()
        result = train(model, dataset, PANET, 0, 1, 1, cfg, 32)
        states.append(result.state_dict)
        assert [p["step"] for p in result.curve] == [4, 8, 12]
        assert result.curve[-1]["lr"] == pytest.approx(1e-3)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_validation_classes_come_from_training_classes_only(dataset):
    cfg = TrainConfig(steps=4, lr_milestones=(3,), val_classes=3, val_every=2, val_episodes=3)
    train_classes = dataset.train_classes(2)
    kept, held = split_validation_classes(train_classes, cfg, 2)
    assert len(held) == 3 and set(held) <= set(train_classes)
    assert not set(held) & set(dataset.fold_classes(2)) and not set(held) & set(kept)
    torch.manual_seed(0)
    result = train(METHODS.get("test_panet")(), dataset, PANET, 2, 1, 1, cfg, 32)
    assert [v["step"] for v in result.validation] == [2, 4]
    assert result.best_step in (2, 4) and result.val_classes == held


def test_impossible_training_config():
    with pytest.raises(FsbenchError, match="steps=0"):
        TrainConfig(steps=0)


def _train_tiny(dataset, name="test_canet", **kwargs):
    cfg = TrainConfig(steps=9, lr=1e-2, lr_milestones=(6,), log_every=3, seed=4)
    torch.manual_seed(cfg.seed)
    return train(METHODS.get(name)(), dataset, PANET, 1, 1, 2, cfg, 32, **kwargs)


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_input_workers_do_not_change_the_result(dataset):
    # CANet has dropout: the DataLoader must not draw from the global torch RNG either.
    inline = _train_tiny(dataset, workers=0)
    piped = _train_tiny(dataset, workers=2)
    assert _same_weights(inline.state_dict, piped.state_dict)
    assert inline.curve == piped.curve


def test_interrupted_training_resumes_bit_for_bit(dataset, tmp_path):
    reference = _train_tiny(dataset)
    resume = tmp_path / "resume.pt"

    def crash(step, steps):
        if step == 7:
            raise KeyboardInterrupt  # killed after the checkpoint of step 6

    with pytest.raises(KeyboardInterrupt):
        _train_tiny(dataset, resume_path=resume, checkpoint_every=2, progress=crash)
    assert torch.load(resume, weights_only=False)["step"] == 6
    resumed = _train_tiny(dataset, resume_path=resume, checkpoint_every=2)
    assert resumed.resumed_from == 6 and reference.resumed_from == 0
    assert _same_weights(reference.state_dict, resumed.state_dict)
    assert resumed.curve == reference.curve


def test_bf16_training_and_evaluation_on_cpu(dataset):
    fp32 = _train_tiny(dataset, "test_panet")
    cfg = TrainConfig(steps=9, lr=1e-2, lr_milestones=(6,), log_every=3, seed=4, precision="bf16")
    torch.manual_seed(cfg.seed)
    bf16 = train(METHODS.get("test_panet")(), dataset, PANET, 1, 1, 2, cfg, 32)
    losses = [point["total"] for point in bf16.curve]
    assert all(np.isfinite(losses)) and not _same_weights(fp32.state_dict, bf16.state_dict)
    assert all(v.dtype == torch.float32 for v in bf16.state_dict.values())  # weights stay fp32
    with pytest.raises(FsbenchError, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.gpu
def test_cuda_training_pipeline_and_bf16(dataset):
    results = []
    for workers in (0, 2):
        cfg = TrainConfig(steps=6, lr_milestones=(4,), log_every=3, seed=1, precision="bf16")
        torch.manual_seed(1)
        model = METHODS.get("test_panet")()
        results.append(train(model, dataset, PANET, 0, 1, 1, cfg, 32, "cuda", workers=workers))
    assert all(np.isfinite(p["total"]) for r in results for p in r.curve)
    assert all(v.device.type == "cpu" for v in results[0].state_dict.values())
    assert torch.backends.cudnn.benchmark


def test_training_recipe_values_optimizer_groups_and_constant_lr():
    """SG-One's official recipe as grid values: per-group lr factors over the method's groups,
    SGD momentum 0.99, constant lr; Adam on request; unknown groups are one clear error."""
    from fsbench.benchmarks.grid.files import _train_overrides
    from fsbench.benchmarks.grid.recipes import TrainConfig
    from fsbench.benchmarks.training.optim import make_optimizer
    from fsbench.core import FsbenchError
    from fsbench.methods import METHODS

    raw = {
        "lr": 1e-5,
        "momentum": 0.99,
        "lr_schedule": "constant",
        "lr_mult": {"bias": 2, "last_weight": 10, "last_bias": 20},
        "lr_milestones": [1],
    }
    cfg = TrainConfig(**dict(_train_overrides(raw, "train")))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    model = METHODS.get("test_sgone")()
    optimizer = make_optimizer(model, cfg)
    lrs = sorted(round(g["lr"] / 1e-5) for g in optimizer.param_groups)
    assert lrs == [1, 2, 10, 20] and optimizer.defaults["momentum"] == 0.99
    guidance = {id(p) for p in model.guidance.parameters()}
    last = [g for g in optimizer.param_groups if round(g["lr"] / 1e-5) >= 10]
    assert {id(p) for g in last for p in g["params"]} == guidance
    adam = make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-4))
    assert isinstance(adam, torch.optim.Adam)
    with pytest.raises(FsbenchError, match="no parameter group"):
        make_optimizer(METHODS.get("test_panet")(), TrainConfig(lr_mult=(("bias", 2.0),)))
    with pytest.raises(FsbenchError, match="optimizer='rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    # settings at their defaults stay out of a cell's identity (finished results keep their ids)
    assert set(TrainConfig().to_dict()).isdisjoint({"optimizer", "lr_schedule", "lr_mult"})


def test_constant_lr_schedule_ignores_milestones(dataset):
    from fsbench.benchmarks.grid.recipes import TrainConfig
    from fsbench.benchmarks.training.train import train
    from fsbench.datasets.protocols import get_protocol
    from fsbench.methods import METHODS

    torch.manual_seed(0)
    for schedule, final in (("constant", 0.01), ("step", 0.001)):
        cfg = TrainConfig(steps=3, lr=0.01, lr_milestones=(1,), log_every=1, lr_schedule=schedule)
        result = train(
            METHODS.get("test_panet")(), dataset, get_protocol("panet"), 0, 1, 1, cfg, 32, "cpu"
        )
        assert result.curve[-1]["lr"] == pytest.approx(final)


def test_pfenet_scoring_upsamples_the_whole_input_onto_the_original_square(dataset):
    """PFENet's test.py (ori_resize): the S×S scores, bilinear with align_corners=True, onto the
    longer side's square; the label there is padded with 255, so only the image is scored."""
    import torch.nn.functional as F

    from fsbench.benchmarks.evaluation.evaluator import EpisodeCounter, QueryRef
    from fsbench.benchmarks.metrics import SegmentationMeter

    # objects of any size (the session dataset's 64-px images are too small for 2·32·32 px)
    protocol = dataclasses.replace(get_protocol("pfenet"), min_object_pixels=1)
    manifest = EpisodeManifest.build(dataset, protocol, 0, 1, 1, 1, 5, sampler="fsbench")
    spec = manifest.episodes[0]
    loader = EpisodeLoader(dataset, 40, resize="keep_ratio_pad")
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 40, 40)
    scorer = EpisodeCounter(loader, manifest, protocol, keep_predictions=1)
    scorer.process(logits, loader.load(spec).query_labels, [QueryRef(0, spec, 0)])
    counts, kept = scorer.result()
    masks, void = dataset.load_masks(spec.query[0], list(spec.classes))  # 48 × 64 original
    label = torch.from_numpy(masks[0]).long()
    label[torch.from_numpy(void)] = 255
    square = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
    expected = square[0, :, :48, :64].argmax(0)
    assert torch.equal(kept[0]["prediction"], expected)
    meter = SegmentationMeter(dataset.fold_classes(0))
    meter.update(expected, label, spec.classes, 0)
    assert np.array_equal(counts.per_class, meter.counts().per_class)
    shifted = F.interpolate(logits[..., :24, :40], size=(48, 64), mode="bilinear").argmax(1)[0]
    assert not torch.equal(shifted, expected)  # the former crop-and-resize scored differently


class TwoScales(FewShotMethod):
    """A feature pyramid of two maps (strides 4 and 8): cosine similarity to masked-average
    prototypes on each map, upsampled and summed."""

    trainable = False
    cacheable_encoder = True
    feature_layout = "maps"

    def __init__(self):
        super().__init__()
        self.fine = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.coarse = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def encode(self, images):
        fine = self.fine(images)
        return fine, self.coarse(torch.relu(fine))

    def predict(self, support, fg, bg, query, out_size):
        logits = 0
        for s, q in zip(support, query):  # [N, K, C, h, w], [Q, C, h, w]
            size = s.shape[-2:]
            masks = torch.cat([bg.flatten(0, 1).amin(0, keepdim=True), fg.flatten(0, 1)])
            masks = torch.nn.functional.interpolate(masks[:, None].float(), size=size)
            way, shot = fg.shape[:2]
            features = s.flatten(0, 1)  # [N·K, C, h, w]
            prototypes = [(features * masks[0]).sum((0, 2, 3)) / (masks[0].sum() + 1e-5)]
            for n in range(way):
                m, f = masks[1 + n * shot : 1 + (n + 1) * shot], features[n * shot : (n + 1) * shot]
                prototypes.append((f * m).sum((0, 2, 3)) / (m.sum() + 1e-5))
            score = torch.nn.functional.cosine_similarity(
                q[:, None], torch.stack(prototypes)[None, :, :, None, None], dim=2
            )
            logits = logits + torch.nn.functional.interpolate(score, size=out_size)
        return logits


@pytest.mark.parametrize("way, shot", [(1, 1), (2, 3)])
def test_a_feature_pyramid_is_cached_as_one_vector_per_image(dataset, way, shot):
    # The "maps" layout: the cache holds each image's two maps as one flat vector (4·8·8 + 6·4·4
    # floats at 32 px), spills and reads them back like any map, and the cached, batched
    # prediction equals model(episode) on loaded images, episode for episode.
    torch.manual_seed(0)
    model = TwoScales().eval()
    manifest = EpisodeManifest.build(dataset, PANET, 0, way, shot, 10, 7)
    loader = EpisodeLoader(dataset, 32)
    plain, _, plain_kept = evaluate(model, loader, manifest, PANET, keep_predictions=3)
    one = 4 * (4 * 8 * 8 + 6 * 4 * 4)
    cache = FeatureCache(model, loader, "cpu", max_bytes=3 * one, batch_size=4)
    cached, _, kept = evaluate(model, loader, manifest, PANET, cache=cache, keep_predictions=3)
    assert cache.feature_bytes == one and cache.spilled > 0
    assert np.array_equal(plain.per_class, cached.per_class)
    assert np.array_equal(plain.foreground, cached.foreground)
    assert all(torch.equal(a["prediction"], b["prediction"]) for a, b in zip(kept, plain_kept))
    assert plain.miou() > 0


def test_system_sampler_measures_this_process_and_stays_bounded(monkeypatch):
    from fsbench.benchmarks.execution import sampler as sampler_module
    from fsbench.benchmarks.tracking.cell_run import system_points

    monkeypatch.setattr(sampler_module, "MAX_SAMPLES", 4)
    with sampler_module.SystemSampler(interval=0.02) as system:
        block = torch.ones(16, 2**20)  # 64 MiB held while sampling
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            block.add_(1.0)  # busy: CPU time accrues
    samples = system.samples
    assert 2 <= len(samples) <= 5  # halved whenever it reached 4
    assert system.interval > 0.02  # and the interval doubled
    assert [s["time"] for s in samples] == sorted(s["time"] for s in samples)
    assert max(s["cpu_utilization_percentage"] for s in samples) > 20
    assert samples[-1]["process_memory_rss_megabytes"] > 64
    points = system_points(samples)
    assert {p[0] for p in points} >= {
        "system/cpu_utilization_percentage",
        "system/process_memory_rss_megabytes",
    }
    assert [p[3] for p in points if p[0].endswith("rss_megabytes")] == list(range(len(samples)))
