"""The work a worker does (train one cell, evaluate a group of cell × seed manifests).

Plain functions of plain data: the serial runner calls them in-process, the Ray runner as tasks.
They return results and never write `results/` or MLflow (only the driver does).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import sys
import time
import uuid
from pathlib import Path

import torch

from fsbench.benchmarks.evaluation.cache import FeatureCache, distinct_images
from fsbench.benchmarks.evaluation.evaluate import evaluate_model
from fsbench.benchmarks.evaluation.evaluator import build_evaluators
from fsbench.benchmarks.execution.sampler import SystemSampler
from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.train import train
from fsbench.core import FsbenchError, import_plugins
from fsbench.datasets.episodes import EpisodeLoader, EpisodeManifest
from fsbench.datasets.protocols import Protocol
from fsbench.datasets.registry import open_dataset
from fsbench.methods import METHODS
from fsbench.methods.weights import read_state_dict


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def job_protocol(config: dict) -> Protocol:
    """The protocol the planner resolved for the job's dataset (a task never looks it up)."""
    return Protocol.from_dict(config["preset"])


def load_plugins(config: dict) -> None:
    """The grid's `imports:` (its own methods and datasets), in whatever process runs a task."""
    execution = config.get("execution") or {}
    import_plugins(execution.get("imports", ()), tuple(execution.get("plugin_paths", ())))


def build_model(config: dict):
    """The cell's model, initialised from its seed (untrained methods: seed 0)."""
    load_plugins(config)
    torch.manual_seed((config.get("train") or {}).get("seed", 0))
    kwargs = dict(config["method_kwargs"])
    declared = METHODS.provides(config["method"])
    if getattr(declared, "model_per_shot", False) and "shot" not in kwargs:
        kwargs["shot"] = config.get("train_shot") or config.get("shot", 1)  # the model's shot
    model = METHODS.build(config["method"], **kwargs)
    if config.get("checkpoint"):
        load_checkpoint(model, config["checkpoint"], config["method"])
    return model


def load_checkpoint(model, checkpoint: dict, method: str) -> None:
    """Released weights into `model`: `format` official through the method's
    `load_official_state_dict`, fsbench (a state dict fsbench saved) directly. A file holding
    {"state_dict": …} or {"model": …} (as training scripts save) is unwrapped."""
    path = Path(checkpoint["path"])
    state = read_state_dict(
        path,
        "checkpoint",
        "check the method entry's `checkpoint:` path",
        sha256=checkpoint.get("sha256"),
    )
    if checkpoint["format"] == "official":
        model.load_official_state_dict(state)
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise FsbenchError(
            f"{path}: does not fit {method} with these kwargs ({first}); a checkpoint saved by "
            "the official code needs format: official"
        ) from None


def upstream_model(init_from: dict, state: dict | None):
    """The trained model an `init_from` training starts from, in eval mode: its weights as
    handed over (`state`), else its checkpoint saved by an earlier run, else (released weights)
    as its own config loads them."""
    model = build_model(init_from["config"])
    if state is None and init_from.get("checkpoint"):
        state = read_state_dict(
            init_from["checkpoint"],
            "checkpoint",
            f"the model {init_from['key']} an init_from entry starts from is gone; rerun the "
            "grid with --rerun to train it again",
        )
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def evaluator_results(names, evaluators) -> dict:
    """{name: result()} of a manifest's evaluators, as JSON (what the seed record keeps)."""
    out = {}
    for name, evaluator in zip(names, evaluators):
        result = evaluator.result()
        try:
            out[name] = json.loads(json.dumps(result))
        except (TypeError, ValueError):
            raise FsbenchError(
                f"evaluator {name!r}: result() gave a {type(result).__name__}, not JSON (numbers, "
                "strings, lists, mappings); convert it before returning"
            ) from None
    return out


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    # The kernels' instruction set is part of the record: trained weights agree bit for bit on one
    # CPU type, not across types (AVX2 vs AVX-512 kernels round differently).
    isa = torch.backends.cpu.get_cpu_capability()
    arch = platform.processor() or platform.machine()
    return f"cpu ({arch}, {isa}, {torch.get_num_threads()} threads)"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or Ray's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _limit_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def train_task(
    config: dict,
    device: str = "auto",
    threads: int | None = None,
    reporter=None,
    upstream_state: dict | None = None,
) -> dict:
    """Train one cell's model; returns the selected state dict (CPU tensors) and its curve.
    An `init_from` job first hands its method the model it starts from: built from that
    entry's config with `upstream_state` (trained in this run) or its saved checkpoint."""
    started_at = time.time()
    _limit_threads(threads)
    device = resolve_device(device)
    protocol = job_protocol(config)
    model = build_model(config)
    if config.get("init_from_model"):  # the job's config; the cell's "init_from" is its key
        model.init_from(upstream_model(config["init_from_model"], upstream_state))
    cfg = TrainConfig.from_dict(config["train"])
    execution = config.get("execution") or {}
    with SystemSampler() as system:
        result = train(
            model,
            open_dataset(cfg.training_data or config["dataset"], protocol),
            protocol,
            config["fold"],
            config["way"],
            config["shot"],
            cfg,
            config["input_size"],
            device,
            workers=execution.get("train_workers", 0),
            resume_path=execution.get("resume_path"),
            checkpoint_every=execution.get("checkpoint_every", 0),
            on_curve=reporter,  # each logged curve point, as it is made
        )
    return {
        "resumed_from": result.resumed_from,
        "state_dict": result.state_dict,
        "curve": result.curve,
        "curve_times": result.curve_times,  # wall clock of each point (MLflow's timestamps)
        "started_at": started_at,
        "ended_at": time.time(),
        "validation": result.validation,
        "best_step": result.best_step,
        "seconds": result.seconds,
        "train_classes": result.train_classes,
        "val_classes": result.val_classes,
        "train_list": result.train_list,
        "train_list_fingerprint": result.train_list_fingerprint,
        "excluded_images": result.excluded_images,
        **({"stages": result.stages} if result.stages else {}),
        **({"init_from": config["init_from"]} if config.get("init_from") else {}),
        "device": device_label(device),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "system": system.samples,  # the MLflow runs' system metrics
    }


def eval_task(
    model_config: dict,
    state_dict,
    items: list[dict],
    device: str = "auto",
    threads: int | None = None,
    cache_bytes: int = 2 << 30,
    batch_size: int = 16,
    keep_predictions: int = 2,
) -> list[dict]:
    """Evaluate one model on several (cell, seed) manifests with one shared feature cache.

    items: [{"cell_id", "seed", "annotation", "manifest": manifest JSON, and the "preset" and
    "input_size" it is scored under}].
    """
    started_at = time.time()
    _limit_threads(threads)
    device = resolve_device(device)
    model = build_model(model_config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())  # frozen ones included: its size
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    execution = model_config.get("execution") or {}
    manifests = [EpisodeManifest.from_json(item["manifest"]) for item in items]
    precision = model_config.get("eval_precision", "fp32")
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )
    # Items scored under one protocol (its dataset view, resizing, input size) share one encoder
    # cache: annotations change the support masks, not the images. Items without a protocol of
    # their own are scored under the job's.
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        scored = (
            item.get("preset") or model_config["preset"],
            item.get("input_size"),
            item.get("dataset") or model_config["dataset"],  # the test set it is scored on
        )
        groups.setdefault(json.dumps(scored, sort_keys=True), []).append(index)
    results: list = [None] * len(items)
    names = tuple(model_config.get("evaluators") or ())  # the grid's `evaluators:`
    extra = [build_evaluators(names, model.output_kind) for _ in items]
    encoded, distinct, spilled = 0, 0, 0
    with autocast, SystemSampler() as system:  # features are stored as float32 anyway
        for key, indices in groups.items():
            preset, size, test_set = json.loads(key)
            protocol = Protocol.from_dict(preset)
            cache = FeatureCache(
                model,
                EpisodeLoader(
                    open_dataset(test_set, protocol),
                    size or model_config["input_size"],
                    resize=protocol.resize,
                ),
                device,
                cache_bytes,
                batch_size,
                spill_dir=execution.get("spill_dir"),
                spill_bytes=execution.get("spill_bytes"),
            )
            # The plan: every image these episodes use, encoded once, in full batches, up front.
            distinct += len(distinct_images([manifests[i] for i in indices]))
            jobs = [
                (
                    cache.loader.annotated(
                        items[i].get("annotation", "mask"), weak_seed=items[i]["seed"]
                    ),
                    manifests[i],
                    protocol,
                )
                for i in indices
            ]
            for i, result in zip(
                indices,
                evaluate_model(
                    model, cache, jobs, device, keep_predictions, [extra[i] for i in indices]
                ),
            ):
                results[i] = result
            encoded += cache.encoded
            spilled = max(spilled, cache.peak_spill_bytes)
            cache.close()
    task = uuid.uuid4().hex
    outputs = []
    for item, manifest, (counts, seconds, kept), evaluators in zip(
        items, manifests, results, extra
    ):
        outputs.append(
            {
                "evaluators": evaluator_results(names, evaluators),
                "cell_id": item["cell_id"],
                "seed": item["seed"],
                "manifest_fingerprint": manifest.fingerprint,
                "counts": counts.to_json(),
                # The shared encoding is split evenly over the items it served.
                "eval_seconds": seconds,
                "started_at": started_at,  # wall clock of the task (shared by its items)
                "ended_at": time.time(),
                "task": task,  # the evaluation task (and feature cache) that served this item
                "encoded_images": encoded,
                "distinct_images": distinct,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_device_bytes": (
                    torch.cuda.max_memory_allocated(device)
                    if torch.device(device).type == "cuda"
                    else None
                ),
                "parameters": parameters,
                "pretraining": list(getattr(model, "pretraining", ())),
                "declared_cost": getattr(model, "cost", ""),
                "spill_bytes": spilled,
                "system": system.samples,  # the task's series (shared by its items)
                "predictions": [
                    {"episode": k["episode"], "prediction": k["prediction"].to(torch.uint8)}
                    for k in kept
                ],
                "device": device_label(device),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
    return outputs
