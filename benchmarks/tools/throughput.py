"""Throughput at the real protocol's size, printed side by side (figures, not a timed test).

    python -m fsbench.benchmarks.tools.throughput        # full width, 417 px, CPU or GPU
    python -m fsbench.benchmarks.tools.throughput --width 0.0625 --input-size 64   # a quick look
    python -m fsbench.benchmarks.tools.throughput --method hsnet    # ResNet-50, hsnet, 400 px
    python -m fsbench.benchmarks.tools.throughput --method pfenet   # ResNet-50, pfenet, 473 px
    python -m fsbench.benchmarks.tools.throughput --method bam      # ResNet-50, bam, 473 px
    python -m fsbench.benchmarks.tools.throughput --method hdmnet   # ResNet-50, hdmnet, 473 px
    python -m fsbench.benchmarks.tools.throughput --method gf_sam --skip-full --per-episode 1
        # SAM ViT-H at 1024 px + DINOv2 ViT-L: times an episode, says what a fold needs (a GPU)

On a generated PASCAL-layout set whose fold-0 test pool has about `--pool` images (small images,
resized to the input size as real ones are), with the `panet` protocol's 5 seeds × 1000 episodes:
- the encoder's images/s;
- encodings fsbench's plan makes per model (distinct images) against an official-style loop that
  encodes every image of every episode (episodes × (shots + 1));
- evaluation episodes/s from cached features (batched) and per episode (`model(episode)`), and
  the per-episode work after encoding as a share of one image's encoding;
- the evaluation's peak resident memory (measured in a fresh process) and the peak disk its
  feature cache spilled (HSNet's pyramid is ~40 MB per image at 400 px: a pool that does not fit
  the cache's memory and disk budgets is evaluated episode by episode, never more encodings
  than the official loop);
- training steps/s with the input pipeline (DataLoader workers) and without.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

from fsbench.benchmarks.evaluation.cache import FeatureCache, distinct_images
from fsbench.benchmarks.evaluation.evaluate import evaluate, evaluate_model
from fsbench.benchmarks.execution.tasks import available_cores, device_label, resolve_device
from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.train import train
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.pascal import Pascal5i
from fsbench.datasets.protocols import get_protocol
from fsbench.datasets.synthetic import ensure_synthetic_voc
from fsbench.methods import METHODS

# One fold's test pool ≈ a third of the generated images (see datasets/synthetic.py's classes).
IMAGES_PER_POOL_IMAGE = 3.05


def _dataset(pool: int, image_size: int):
    return Pascal5i(ensure_synthetic_voc(round(pool * IMAGES_PER_POOL_IMAGE), image_size))


# method → (keywords at full size, its lineage's protocol, that protocol's input size)
METHOD_SETTINGS = {
    "panet": ({}, "panet", 417),
    "hsnet": ({"backbone": "resnet50"}, "hsnet", 400),
    "pfenet": ({"layers": 50}, "pfenet", 473),
    # the two-stage lineage: frozen backbone + PSPNet base learner + meta learner, their protocols
    "bam": ({"layers": 50}, "bam", 473),
    "hdmnet": ({"layers": 50}, "hdmnet", 473),
    # the foundation-model track at its real sizes (random weights: the speed is the same):
    # SAM ViT-H at 1024 px, DINOv2 ViT-L/14 at 518 px; Matcher's protocol
    "gf_sam": ({"sam_weights": "random", "dinov2_weights": "random"}, "matcher", 1024),
    "persam": ({"sam_weights": "random"}, "matcher", 518),
    "persam_f": ({"sam_weights": "random"}, "matcher", 518),
    "matcher": ({"sam_weights": "random", "dinov2_weights": "random"}, "matcher", 518),
}
# Methods whose frozen encoders make a CPU run of a fold impractical (SAM ViT-H: ~2.7 TFLOP per
# image at 1024 px): the script times a few episodes and says what a fold needs.
NEEDS_GPU = {"gf_sam", "persam", "persam_f", "matcher"}
METHOD = "panet"  # set by --method (module state: the fresh evaluation process reads it back)


def _model(width: float, seed: int = 0, method: str | None = None):
    import torch

    method = method or METHOD
    torch.manual_seed(seed)
    kwargs = dict(METHOD_SETTINGS[method][0])
    if method == "panet":
        kwargs["width"] = width
    return METHODS.get(method)(**kwargs).eval()


def _manifests(dataset, shot: int, episodes: int, seeds, method: str | None = None):
    protocol = get_protocol(METHOD_SETTINGS[method or METHOD][1])
    return [
        EpisodeManifest.build(dataset, protocol, 0, 1, shot, episodes, s) for s in seeds
    ], protocol


def _evaluate_all(args_tuple):
    """In a fresh process: plan, encode and score every seed's manifest; report peak RSS."""
    import torch

    pool, image_size, width, size, shot, episodes, seeds, device, cache_bytes, threads, method = (
        args_tuple
    )
    torch.set_num_threads(threads)
    dataset = _dataset(pool, image_size)
    manifests, protocol = _manifests(dataset, shot, episodes, seeds, method)
    model = _model(width, method=method).to(device)
    loader = EpisodeLoader(dataset, size, resize=protocol.resize)
    cache = FeatureCache(model, loader, device, cache_bytes, batch_size=16)
    images = distinct_images(manifests)
    # The evaluation task's own dispatch (its method's path, inside the cache's budgets).
    started = time.perf_counter()
    results = evaluate_model(model, cache, [(loader, m, protocol) for m in manifests], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    mious = [counts.miou() for counts, _, _ in results]
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {
        "distinct": len(images),
        "encoded": cache.encoded,
        "spilled": cache.spilled,
        "spill_gb": cache.peak_spill_bytes / 2**30,
        "encode_seconds": cache.encode_seconds,
        # Everything else: decoding waits, pooling, scoring, reading spilled maps.
        "score_seconds": total - cache.encode_seconds,
        "episodes": sum(len(m.episodes) for m in manifests),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": peak_gpu,
        "miou": sum(mious) / len(mious),
    }


def _per_episode_seconds(dataset, manifest, protocol, model, size, device, count):
    """An official-style loop: load the episode's images, run model(episode), score it."""
    subset = EpisodeManifest(manifest.spec, manifest.episodes[:count])
    loader = EpisodeLoader(dataset, size, resize=protocol.resize)
    evaluate(model, loader, EpisodeManifest(subset.spec, subset.episodes[:1]), protocol, device)
    _, seconds, _ = evaluate(model, loader, subset, protocol, device)
    return seconds / count


def _encoder_images_per_second(model, size, device, batch=16, repeats=2):
    import torch

    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        model.encode(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            model.encode(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - started)


def _train_steps_per_second(dataset, width, size, device, workers, steps):
    import torch

    cfg = TrainConfig(steps=steps, lr_milestones=(steps + 1,), log_every=steps)
    torch.manual_seed(0)
    model = _model(width).train()
    started = time.perf_counter()
    train(model, dataset, get_protocol("panet"), 0, 1, 1, cfg, size, device, workers=workers)
    return steps / (time.perf_counter() - started)


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=2500, help="fold-0 test images (≈)")
    parser.add_argument("--image-size", type=int, default=64, help="generated image size")
    parser.add_argument("--width", type=float, default=1.0, help="VGG-16 width (1 = full)")
    parser.add_argument("--method", choices=sorted(METHOD_SETTINGS), default="panet")
    parser.add_argument("--input-size", type=int, default=0, help="default: the protocol's")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-bytes", type=int, default=2 << 30)
    parser.add_argument("--threads", type=int, default=None, help="default: available cores")
    parser.add_argument("--per-episode", type=int, default=10, help="episodes timed one by one")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-workers", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="no full 5 × 1000 evaluation")
    args = parser.parse_args(argv)
    global METHOD
    METHOD = args.method
    args.input_size = args.input_size or METHOD_SETTINGS[args.method][2]
    device = resolve_device(args.device)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    protocol_seeds = get_protocol(METHOD_SETTINGS[args.method][1]).seeds  # each protocol's own
    if len(protocol_seeds) >= args.seeds:
        seeds = list(protocol_seeds[: args.seeds])
    else:
        seeds = list(range(protocol_seeds[0], protocol_seeds[0] + args.seeds))
    dataset = _dataset(args.pool, args.image_size)
    model = _model(args.width).to(device)
    print(
        f"device: {device_label(device)}; {args.method}"
        + (
            f" width {args.width}"
            if args.method == "panet"
            else " (SAM ViT-H, random weights)"
            if args.method in NEEDS_GPU
            else " (ResNet-50)"
        )
        + f", protocol {METHOD_SETTINGS[args.method][1]}, input {args.input_size} px; "
        f"torch {torch.__version__}"
    )
    if model.cacheable_encoder:
        batch = 2 if args.method in NEEDS_GPU else 16
        encoder_rate = _encoder_images_per_second(model, args.input_size, device, batch, 1)
        print(f"encoder: {encoder_rate:.2f} images/s ({1000 / encoder_rate:.1f} ms per image)")
        with torch.no_grad():  # what the cache stores per image (its budgets count these)
            one = torch.zeros(1, 3, args.input_size, args.input_size, device=device)
            bytes_per_image = model.encode_for_cache(one).numel() * 4
        print(
            f"encodings: {bytes_per_image / 2**20:.1f} MiB per image in the cache "
            f"(cache_bytes {args.cache_bytes / 2**30:.1f} GiB holds "
            f"{args.cache_bytes // max(bytes_per_image, 1)} images; the rest spill to disk)"
        )
    else:  # PFENet, BAM, HDMNet: a support's encoding depends on its mask (layer 4 sees it
        # masked; HDMNet's backbone sees the masked image)
        print("encoder: none cacheable (episodes are evaluated as the official loop, one by one)")
    context = multiprocessing.get_context("spawn")
    for shot in args.shots:
        manifests, protocol = _manifests(dataset, shot, args.episodes, seeds)
        split = manifests[0].spec["split"]
        pool = {i for c in dataset.fold_classes(0) for i in dataset.class_images(split, c)}
        official = sum(len(m.episodes) * (shot + 1) for m in manifests)
        per_episode = _per_episode_seconds(
            dataset, manifests[0], protocol, model, args.input_size, device, args.per_episode
        )
        print(
            f"\n{shot}-shot: fold-0 pool {len(pool)} images, {len(seeds)} seeds × {args.episodes}"
        )
        print(f"  official-style loop: {official} encodings, {1 / per_episode:.2f} episodes/s")
        if args.method in NEEDS_GPU:
            fold = protocol.episodes * per_episode / 3600
            print(
                f"  {args.method} at its real size on {device_label(device)}: "
                f"{per_episode:.1f} s per episode, {fold:.1f} h for one fold's "
                f"{protocol.episodes} episodes{' — run it on a GPU' if device == 'cpu' else ''}"
            )
        if args.skip_full:
            print(f"  fsbench plan: {len(distinct_images(manifests))} encodings (not run)")
            continue
        with context.Pool(1) as workers:
            full = workers.apply(
                _evaluate_all,
                (
                    (
                        args.pool,
                        args.image_size,
                        args.width,
                        args.input_size,
                        shot,
                        args.episodes,
                        seeds,
                        device,
                        args.cache_bytes,
                        threads,
                        args.method,
                    ),
                ),
            )
        after = full["score_seconds"] / full["episodes"]
        whole = full["episodes"] / (full["encode_seconds"] + full["score_seconds"])
        if not full["encoded"]:  # the episode path: each episode encodes its own images
            print(
                f"  fsbench: episode by episode ({official} encodings, as the official loop), "
                f"{full['episodes'] / full['score_seconds']:.2f} episodes/s"
            )
        else:
            print(
                f"  fsbench: {full['encoded']} encodings of {full['distinct']} distinct images "
                f"({official / max(full['encoded'], 1):.1f}× fewer; "
                f"{full['spilled']} maps spilled), "
                f"in the encoder {full['encode_seconds']:.0f} s "
                f"({1000 * full['encode_seconds'] / max(full['encoded'], 1):.1f} ms per image)"
            )
            print(
                f"  everything but the encoder: {1 / after:.1f} episodes/s "
                f"({1000 * after:.2f} ms per episode = "
                f"{100 * after * full['encoded'] / max(full['encode_seconds'], 1e-9):.2f}% of one "
                "image's "
                f"encoding); whole evaluation {whole:.2f} episodes/s "
                f"vs {1 / per_episode:.2f} per episode"
            )
        print(
            f"  peak RSS {full['peak_rss_gb']:.2f} GB"
            + (f", peak GPU memory {full['peak_gpu_gb']:.2f} GB" if full["peak_gpu_gb"] else "")
            + f" (cache_bytes {args.cache_bytes / 2**30:.1f} GiB), peak disk spilled "
            f"{full['spill_gb']:.2f} GB; "
            f"mean mIoU {100 * full['miou']:.2f}"
        )
    if args.train_steps and args.method == "panet":
        print()
        for workers in (0, args.train_workers):
            rate = _train_steps_per_second(
                dataset, args.width, args.input_size, device, workers, args.train_steps
            )
            what = "in the loop" if not workers else f"{workers} DataLoader workers"
            print(f"training, episodes decoded {what}: {rate:.2f} steps/s")


if __name__ == "__main__":
    main()
