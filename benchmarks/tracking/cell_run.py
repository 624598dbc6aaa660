"""What a cell's MLflow run holds, read off its cell record: tags, params, metrics (grouped
for the UI), training-curve points, per-episode rows, the manifests as dataset inputs. Plain
values: tracking.py turns them into MLflow entities (only it imports mlflow)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fsbench.benchmarks.grid.names import cell_title, display_name
from fsbench.benchmarks.metrics import METRICS, EpisodeCounts
from fsbench.benchmarks.store.records import CellRecord
from fsbench.benchmarks.tracking.panels import (  # noqa: F401 (verified_episodes re-exported)
    class_names,
    qualitative_strip,
    verified_episodes,
)

CELL_TAG = "fsbench.cell_id"
KIND_TAG = "fsbench.kind"
# The digest of the cell record a run was logged from: a rerun's new file replaces the run.
RECORD_TAG = "fsbench.record"


def record_digest(result: CellRecord) -> str:
    """Identity of one cell record (a rerun's differs: new times, even in the same second)."""
    return hashlib.sha256(json.dumps(result.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def redacted(uri: str) -> str:
    """`uri` with any password replaced by ***, for messages (user:PASS@host → user:***@host)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def local_store(uri: str) -> bool:
    """Whether a tracking URI is a file store on this machine (sqlite, a folder), not a
    server or a database server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def default_tracking_uri(results_root: Path) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(results_root).resolve()}/mlflow.db"
    )


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def cell_params(result: CellRecord) -> dict:
    """The run's params: the config that decides the cell, and what its numbers depend on
    (`depends_on.*`: input size, scoring resolution, episodes × seeds, …)."""
    return flatten("", {**result.config.to_json(), "depends_on": result.depends_on}, {})


def episode_rows(result: CellRecord, manifests_dir: Path) -> list[dict]:
    """Per-episode rows (classes, query ids, TP/FP/FN and IoU per episode class) for every seed."""
    rows = []
    for seed in result.seeds:
        counts = seed.counts
        manifest_file = manifests_dir / f"{seed.manifest_fingerprint[:16]}.json"
        episodes = verified_episodes(manifest_file, seed.manifest_fingerprint)
        for index, per_class in enumerate(EpisodeCounts.from_json(counts).per_class.tolist()):
            spec = episodes[index] if index < len(episodes) else {}
            for class_id, (tp, fp, fn) in zip(counts["classes"], per_class):
                if tp + fp + fn == 0:
                    continue
                rows.append(
                    {
                        "seed": seed.seed,
                        "episode": index,
                        "class": class_id,
                        "query": " ".join(spec.get("query", [])),
                        "support": " ".join(sum(spec.get("support", []), [])),
                        "tp": tp,
                        "fp": fp,
                        "fn": fn,
                        "iou": tp / (tp + fp + fn),
                    }
                )
    return rows


def runs_url(base: str, experiment_id, view: str | None = None) -> str:
    """The UI address that opens an experiment's leaderboard: with `view` (a shared view
    fsbench stored on the experiment, see grid_runs.shared_views) that view; else its runs
    table (the machine-learning view) filtered to the row runs (one per table row: the
    report's Mean column), sorted by mIoU, best first."""
    if experiment_id is None:
        return base
    runs = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if view:  # (the "charts" view opens on the chart view, the others on the table)
        mode = "&compareRunsMode=CHART" if view == "charts" else ""
        return f"{runs}&viewStateShareKey={view}{mode}"
    return (
        f"{runs}&searchFilter=tags.%60fsbench.kind%60%20%3D%20%27row%27"
        "&orderByKey=metrics.%60miou%60&orderByAsc=false"
    )


def run_name(result: CellRecord) -> str:
    """The cell run's name: its title (`PANet w/o PAR · fold 0 · 1-shot`); records written
    before titles were display names get one computed."""
    if " · " in result.title:
        return result.title
    return cell_title(result.config, result.display, method_display=result.method_display)


def cell_tags(result: CellRecord, digest: str) -> dict[str, str]:
    config, environment = result.config, result.environment
    return {
        KIND_TAG: "cell",
        CELL_TAG: result.cell_id,
        "method": config.method,
        "row": config.row,
        "dataset": config.dataset_name,
        "fold": str(config.fold),
        "way": str(config.way),
        "shot": str(config.shot),
        "protocol": config.protocol,
        "scored_under": config.scored_under,
        "git_sha": environment["git_sha"],
        "device": environment["device"],
        "manifest_fingerprints": ",".join(s.manifest_fingerprint[:16] for s in result.seeds),
        RECORD_TAG: digest,
        "display": display_name(config, result.display, result.method_display),
        "mlflow.note.content": cell_description(result),
        **{
            f"eval.{key}": str(result.timings[key])
            for key in ("encoded_images", "distinct_images")
            if result.timings.get(key) is not None
        },
        # the training list the model drew from, fingerprinted (exclude_novel_images filters it)
        **{
            f"train.{key}": str(result.train[key])
            for key in ("train_list", "train_list_fingerprint", "excluded_images")
            if result.train and result.train.get(key) not in (None, "")
        },
        "fsbench.finished_at": result.finished_at,
        # MLflow's own source fields (the UI's "Source" and git commit columns)
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "fsbench",
        "mlflow.source.git.commit": environment["git_sha"],
        "fsbench.git_dirty": str(environment.get("git_dirty")),
    }


SHOWN_DECIMALS = 1  # percent as the tables print it (exact values: the cell file, seeds.csv)


def cell_metrics(result: CellRecord) -> dict[str, float]:
    """What the runs table compares, in the tables' units: every registered metric's mean and
    std over seeds in percent, then time/… and eval/… peaks. Per-seed values and per-class IoU
    are table artifacts (seeds.csv, class_iou.csv), not dozens of mostly-empty metrics."""
    summary, timings = result.summary, result.timings
    metrics = {}
    for name in (m for m in METRICS if f"{m}_mean" in summary):  # as the tables print them
        metrics[name] = round(100 * summary[f"{name}_mean"], SHOWN_DECIMALS)
        metrics[f"{name}_std"] = round(100 * summary[f"{name}_std"], SHOWN_DECIMALS)
    metrics["time/train_seconds"] = round(timings["train_seconds"], 1)
    metrics["time/eval_seconds"] = round(timings["eval_seconds"], 1)
    for key in ("peak_rss_bytes", "spill_bytes"):  # older cells lack them
        if timings.get(key) is not None:
            metrics[f"eval/{key}"] = timings[key]
    return metrics


def cell_description(result: CellRecord) -> str:
    """The run's description (MLflow's note): what the cell is and what its numbers depend on."""
    config = result.config
    seeds = ", ".join(str(s.seed) for s in result.seeds)
    train = config.train
    if train is None:
        trained = (
            f"released weights {Path(config.checkpoint['path']).name}"
            if config.checkpoint
            else "untrained"
        )
        rule = "no training"
    else:
        trained = f"trained {train['steps']} steps (train seed {train.get('seed', 0)})"
        rule = (
            f"checkpoint: best of {train['val_classes']} held-out training classes"
            if train.get("val_classes")
            else "checkpoint: last step"
        )
    return (
        f"**{cell_title(config, result.display, method_display=result.method_display)}**: "
        f"{display_name(config, result.display, result.method_display)} "
        f"(`{config.row}`) on {config.dataset_name} fold {config.fold}, {config.way}-way "
        f"{config.shot}-shot, {config.annotation} supports, input {config.input_size} px. "
        f"Protocol {config.protocol}: {config.episodes} episodes × seeds {seeds} "
        f"(manifests {', '.join(s.manifest_fingerprint[:12] for s in result.seeds)}). "
        f"{trained.capitalize()}; {rule}. Metrics in percent, mean ± std over episode seeds; "
        "per-class IoU in class_iou.csv, per-seed values in seeds.csv."
    )


def curve_points(result: CellRecord, end_ms: int) -> list[tuple[str, float, int, int]]:
    """(train/<loss>, value, wall-clock ms, step) of the training curve, at the times the
    points were recorded (records without them: the run's end)."""
    train = result.train or {}
    times = train.get("curve_times") or []
    points = []
    for index, point in enumerate(train.get("curve", [])):
        stamp = times[index] if index < len(times) else end_ms
        for name, value in point.items():
            if name != "step":
                points.append((f"train/{name}", float(value), stamp, point["step"]))
    return points


def system_points(samples: list[dict]) -> list[tuple[str, float, int, int]]:
    """(system/<name>, value, wall-clock ms, step) of a worker's sampled series: MLflow's
    System metrics tab plots the `system/` metrics."""
    return [
        (f"system/{name}", float(value), sample["time"], step)
        for step, sample in enumerate(samples)
        for name, value in sample.items()
        if name != "time"
    ]


def metric_points(result: CellRecord, end_ms: int) -> list[tuple[str, float, int, int]]:
    """Every metric point of a cell run: the summary (at the run's end), the training curve,
    and the system metrics of its training and evaluation."""
    points = [(k, float(v), end_ms, 0) for k, v in cell_metrics(result).items()]
    series = (result.train or {}).get("system", []) + result.timings.get("system", [])
    return points + curve_points(result, end_ms) + system_points(series)


def manifest_datasets(result: CellRecord, manifests_dir: Path) -> list[dict]:
    """Each seed's manifest as MLflow `Dataset` fields (name, 16-hex digest, source, profile)."""
    config = result.config
    datasets = []
    for seed in result.seeds:
        fingerprint = seed.manifest_fingerprint
        path = Path(manifests_dir) / f"{fingerprint[:16]}.json"
        profile = {"episodes": seed.episodes, "seed": seed.seed, "fold": config.fold}
        datasets.append(
            {
                "name": (
                    f"{config.dataset_name} fold{config.fold} {config.way}w"
                    f"{config.shot}s seed {seed.seed} ({config.protocol})"
                ),
                "digest": fingerprint[:16],
                "source_type": "local",
                "source": path.as_uri(),
                "profile": json.dumps(profile),
            }
        )
    return datasets


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def write_artifacts(result: CellRecord, store, folder: Path) -> list[Path]:
    """The cell run's files, written into `folder`: config.json, episodes.csv (a row per
    episode class) and the qualitative strip (left out, with one line, when it cannot be drawn)."""
    (folder / "config.json").write_text(json.dumps(result.config.to_json(), indent=1))
    rows = episode_rows(result, store.manifests_dir)
    with open(folder / "episodes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["episode"])
        writer.writeheader()
        writer.writerows(rows)
    names = class_names(result.config.dataset_name)
    with open(folder / "class_iou.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["class_id", "class", "iou_percent", *[f"seed_{s.seed}" for s in result.seeds]]
        )
        for class_id, value in result.summary["class_iou_mean"].items():
            per_seed = [s.class_iou.get(class_id) for s in result.seeds]
            writer.writerow(
                [class_id, names.get(int(class_id), class_id), _percent(value)]
                + [_percent(v) for v in per_seed]
            )
    with open(folder / "seeds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        metrics = [m for m in METRICS if m in result.seeds[0].metrics]
        writer.writerow(["seed", "episodes", "manifest", *[f"{m}_percent" for m in metrics]])
        for seed in result.seeds:
            writer.writerow(
                [seed.seed, seed.episodes, seed.manifest_fingerprint[:16]]
                + [_percent(seed.metrics[m]) for m in metrics]
            )
    written = [folder / n for n in ("config.json", "episodes.csv", "class_iou.csv", "seeds.csv")]
    try:
        figure = qualitative_strip(result, store, folder / "qualitative.png", max_episodes=2)
    except Exception as error:  # noqa: BLE001 - a figure must never stop the logging
        print(f"fsbench: qualitative figure skipped ({error})", file=sys.stderr)
        figure = None
    return written + ([figure] if figure is not None else [])
