"""The driver: what the executors' tasks return becomes results. It alone writes `results/`
(each cell atomically, once all its seeds are in) and feeds the tracker (MLflow)."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

from fsbench.benchmarks.evaluation.cache import distinct_images
from fsbench.benchmarks.execution.planning import Job, Plan
from fsbench.benchmarks.grid.files import Cell, GridSpec
from fsbench.benchmarks.grid.provenance import depends_on
from fsbench.benchmarks.store.records import CellRecord, SeedRecord, summarise
from fsbench.benchmarks.store.results import ResultStore, environment, file_sha256, now_iso
from fsbench.core import one_line
from fsbench.methods import METHODS


def failure_line(error: str) -> str:
    """A task's error as one line: an exception re-raised from a DataLoader worker carries the
    worker's whole traceback ("Caught X in DataLoader worker … Original Traceback …"); its last
    line is the error itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        kind, _, message = lines[-1].partition(": ")
        lines = [f"{kind.rsplit('.', 1)[-1]}: {message}" if message else lines[-1]]
    return one_line(" ".join(lines))


class Driver:
    """Collects task results; writes each cell when complete; logs it; reports progress."""

    def __init__(self, grid: GridSpec, store: ResultStore, plan: Plan, tracker=None, progress=True):
        self.grid, self.store, self.plan, self.tracker = grid, store, plan, tracker
        self.cells = {c.id: c for c in plan.todo}
        self.seed_outputs: dict[str, list[dict]] = defaultdict(list)
        self.train_info: dict[str, dict] = {}
        self.checkpoints: dict[str, str] = {}
        self.written: list[str] = []
        self.failed: dict[str, str] = {}
        self.started = time.perf_counter()
        self.record_seconds = 0.0  # driver time spent writing results and logging to MLflow
        self.task_seconds = 0.0  # compute time reported by the tasks (train + evaluation)
        self.bar = None
        self._described: set[str] = set()  # trainings whose description reached the tracker
        if progress and plan.todo:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=len(plan.todo),
                unit="cell",
                desc=grid.name,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def on_progress(self, job: Job, point: dict) -> None:
        """A training curve point while the training runs (to MLflow, off the driver's path)."""
        if self.tracker is not None:
            about = None
            if job.key not in self._described:  # the first point: what the training is
                self._described.add(job.key)
                about = (job.config, job.cells)  # the tracker says what the training is
            self.tracker.log_progress(job.key, f"{job.cells[0].title} (training)", point, about)

    def on_train(self, job: Job, info: dict, state_dict) -> None:
        if self.tracker is not None:
            self.tracker.finish_training(job.key, info.get("system") or [])
        path = self.store.save_checkpoint(job.key, state_dict)
        self.store.resume_path(job.key).unlink(missing_ok=True)  # the final weights are saved
        self.checkpoints[job.key] = {
            "checkpoint": os.path.relpath(path, self.store.grid_dir),
            "checkpoint_bytes": path.stat().st_size,
            "checkpoint_sha256": file_sha256(path),
        }
        self.train_info[job.key] = {k: v for k, v in info.items() if k != "state_dict"}
        self._finish_complete(job)

    def on_eval(self, job: Job, output: dict) -> None:
        self.seed_outputs[output["cell_id"]].append(output)
        self._finish_complete(job)

    def _finish_complete(self, job: Job) -> None:
        """Write the job's cells that have every seed and, if the job trains, its training record.

        Ray may hand over an evaluation before the training record it waited on (both results
        are ready; `ray.wait` picks either), so neither arrival alone completes a cell.
        """
        if job.trainable and job.key not in self.train_info:
            return
        for cell in job.cells:
            if len(self.seed_outputs.get(cell.id, ())) == len(cell.seeds):
                self._finish(job, cell)

    def on_failure(self, job: Job, error: str) -> None:
        error = failure_line(error)
        for cell in job.cells:
            if cell.id not in self.written:
                self.failed[cell.id] = error
                self._say(f"FAILED {cell.title}: {error}")
                if self.bar:
                    self.bar.update(1)

    def _finish(self, job: Job, cell: Cell) -> None:
        started = time.perf_counter()
        outputs = sorted(self.seed_outputs.pop(cell.id), key=lambda o: cell.seeds.index(o["seed"]))
        seeds = [SeedRecord.from_evaluation(o) for o in outputs]
        train = self.train_info.get(job.key)
        tasks = {o["task"]: o for o in outputs}  # the evaluation task(s) that served this cell
        record = CellRecord(
            cell_id=cell.id,
            grid=self.grid.name,
            row_index=[m.row() for m in self.grid.methods].index(cell.method.row()),
            title=cell.title,
            display=cell.method.display or None,  # tables' and figures' name (not identity)
            method_display=METHODS.display(cell.method.name),
            config=cell.settings(),
            protocol=cell.preset.to_dict(),  # as resolved for the dataset
            depends_on=depends_on(cell),
            summary=summarise(seeds),
            seeds=tuple(seeds),
            train=train,
            **self.checkpoints.get(job.key, {}),
            model_key=job.key,
            imports=tuple(self.grid.imports),
            plugin_paths=tuple(self.grid.plugin_paths),
            qualitative=tuple(
                {
                    "seed": outputs[0]["seed"],
                    "episode": p["episode"],
                    "prediction": p["prediction"].tolist(),
                }
                for p in outputs[0]["predictions"]
            ),
            timings={
                # wall clock (epoch s) of the cell's work: its training's start to its last
                # evaluation's end (MLflow's run times)
                "started_at": min(
                    [o.get("started_at", time.time()) for o in outputs]
                    + ([train["started_at"]] if train and "started_at" in train else [])
                ),
                "ended_at": max(o.get("ended_at", time.time()) for o in outputs),
                "train_seconds": train["seconds"] if train else 0.0,
                "eval_seconds": sum(o["eval_seconds"] for o in outputs),
                # encoder passes of the evaluation task(s) that served this cell (a task grouped
                # by model serves all its cells: its encodings are shared, not per cell) …
                "encoded_images": sum({o["task"]: o["encoded_images"] for o in outputs}.values()),
                # … against the distinct images of this cell's own manifests
                "distinct_images": len(
                    distinct_images(self.plan.manifests[(cell.id, s)] for s in cell.seeds)
                ),
                # peaks of the evaluation task(s): resident memory, disk spilled by the cache
                "peak_rss_bytes": max(o.get("peak_rss_bytes") or 0 for o in outputs),
                "peak_device_bytes": max(o.get("peak_device_bytes") or 0 for o in outputs),
                "parameters": outputs[0].get("parameters"),  # the model's, frozen ones included
                # data its weights saw beyond ImageNet (methods' `pretraining`): tables mark it
                "pretraining": outputs[0].get("pretraining") or [],
                "declared_cost": outputs[0].get("declared_cost") or "",
                "spill_bytes": max(o.get("spill_bytes") or 0 for o in outputs),
                # the evaluation task(s)' system metrics, once per task, in time order
                "system": sorted(
                    (s for o in tasks.values() for s in o.get("system", [])),
                    key=lambda s: s["time"],
                ),
            },
            environment={
                **environment(),
                "device": outputs[0]["device"],
                "hosts": sorted({o["host"] for o in outputs}),
            },
            finished_at=now_iso(),
        )
        self.store.write_cell(record)
        self.written.append(cell.id)
        if self.tracker is not None:
            self.tracker.log_cell(record, self.store)
        self.record_seconds += time.perf_counter() - started
        timings, summary = record.timings, record.summary
        self.task_seconds += timings["train_seconds"] + timings["eval_seconds"]
        self._say(
            f"done {cell.title}: mIoU {100 * summary['miou_mean']:.1f} ± "
            f"{100 * summary['miou_std']:.1f}, FB-IoU {100 * summary['fb_iou_mean']:.1f} "
            f"({timings['train_seconds']:.0f}s train, {timings['eval_seconds']:.1f}s eval)"
        )
        if self.bar:
            self.bar.update(1)

    def _say(self, line: str) -> None:
        if self.bar:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
