"""Runs a grid: a plan (planning.py) → train/evaluate jobs, serial or Ray → results + MLflow.

Only this module imports ray. Workers return results; the driver alone writes `results/` (each
cell atomically, once all its seeds are in) and logs to MLflow (DESIGN §6).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

from fsbench.benchmarks.evaluate import distinct_images
from fsbench.benchmarks.grid import Cell, GridSpec
from fsbench.benchmarks.planning import Job, Plan, plan_grid
from fsbench.benchmarks.results import (
    ResultStore,
    environment,
    file_sha256,
    now_iso,
    seed_result,
    summarise,
)
from fsbench.benchmarks.tasks import available_cores, eval_task, train_task
from fsbench.benchmarks.watchdog import RayWatchdog
from fsbench.core import FsbenchError


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
            self.tracker.log_progress(job.key, f"{job.cells[0].title} (training)", point)

    def on_train(self, job: Job, info: dict, state_dict) -> None:
        if self.tracker is not None:
            self.tracker.finish_training(job.key)
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
        for cell in job.cells:
            if cell.id not in self.written:
                self.failed[cell.id] = error
                self._say(f"FAILED {cell.title}: {error}")
                if self.bar:
                    self.bar.update(1)

    def _finish(self, job: Job, cell: Cell) -> None:
        started = time.perf_counter()
        outputs = sorted(self.seed_outputs.pop(cell.id), key=lambda o: cell.seeds.index(o["seed"]))
        seeds = [seed_result(o) for o in outputs]
        train = self.train_info.get(job.key)
        result = {
            "version": 1,
            "cell_id": cell.id,
            "grid": self.grid.name,
            "row_index": [m.row() for m in self.grid.methods].index(cell.method.row()),
            "title": cell.title,
            "display": cell.method.display or None,  # tables' and figures' name (not identity)
            "config": cell.config(),
            "protocol": cell.preset.to_dict(),  # as resolved for the dataset
            "summary": summarise(seeds),
            "seeds": seeds,
            "train": train,
            "checkpoint": None,
            **self.checkpoints.get(job.key, {}),
            "model_key": job.key,
            # modules that registered the grid's own methods/datasets (to rebuild the model)
            "imports": list(self.grid.imports),
            "plugin_paths": list(self.grid.plugin_paths),
            "qualitative": [
                {
                    "seed": outputs[0]["seed"],
                    "episode": p["episode"],
                    "prediction": p["prediction"].tolist(),
                }
                for p in outputs[0]["predictions"]
            ],
            "timings": {
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
            },
            "environment": {
                **environment(),
                "device": outputs[0]["device"],
                "hosts": sorted({o["host"] for o in outputs}),
            },
            "finished_at": now_iso(),
        }
        self.store.write_cell(result)
        self.written.append(cell.id)
        if self.tracker is not None:
            self.tracker.log_cell(result, self.store)
        self.record_seconds += time.perf_counter() - started
        self.task_seconds += result["timings"]["train_seconds"] + result["timings"]["eval_seconds"]
        summary = result["summary"]
        self._say(
            f"done {cell.title}: mIoU {100 * summary['miou_mean']:.1f} ± "
            f"{100 * summary['miou_std']:.1f}, FB-IoU {100 * summary['fb_iou_mean']:.1f} "
            f"({result['timings']['train_seconds']:.0f}s train, "
            f"{result['timings']['eval_seconds']:.1f}s eval)"
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


class SerialExecutor:
    """In-process, one job after another (tests, debugging, machines without Ray)."""

    name = "serial"

    def __init__(self, device="auto", threads=None, cache_bytes=2 << 30, batch_size=16):
        # In-process, one job at a time: use every core available to us unless told otherwise.
        self.device, self.threads = device, threads or available_cores()
        self.cache_bytes, self.batch_size = cache_bytes, batch_size

    def run(self, jobs: list[Job], driver: Driver) -> None:
        previous = _torch_threads()
        try:
            for job in jobs:
                try:
                    state = None
                    if job.trainable:
                        info = train_task(
                            job.config,
                            self.device,
                            self.threads,
                            reporter=lambda point, job=job: driver.on_progress(job, point),
                        )
                        state = info["state_dict"]
                        driver.on_train(job, info, state)
                    for output in eval_task(
                        job.config,
                        state,
                        job.items,
                        self.device,
                        self.threads,
                        self.cache_bytes,
                        self.batch_size,
                    ):
                        driver.on_eval(job, output)
                except FsbenchError as error:  # e.g. a corrupt image: this job's cells only
                    driver.on_failure(job, str(error))
                except Exception as error:  # one broken job must not lose the others' results
                    driver.on_failure(job, f"{type(error).__name__}: {error}")
        finally:
            _torch_threads(previous)


def _torch_threads(value=None):
    import torch

    if value is not None:
        torch.set_num_threads(value)
    return torch.get_num_threads()


def _train_with_state(config, device, threads, progress=None, key=None):
    """Ray task body: (state dict, info) as two objects, so evaluations fetch only the weights.
    `progress` (a Ray queue) carries the training curve to the driver as it is made."""

    def report(point):
        try:
            progress.put_nowait((key, point))
        except Exception:  # noqa: BLE001 - progress is best effort; the curve is in the result
            pass

    info = train_task(config, device, threads, reporter=report if progress else None)
    return info.pop("state_dict"), info


class RayExecutor:
    """Ray core tasks: train → evaluate per job as a task graph; retries on dead workers."""

    name = "ray"

    def __init__(
        self,
        address=None,
        num_cpus=None,
        device="auto",
        threads=None,
        max_retries=3,
        eval_gpu_fraction=0.5,
        eval_group="model",
        cache_bytes=2 << 30,
        batch_size=16,
    ):
        self.address, self.num_cpus, self.device = address, num_cpus, device
        self.threads = threads or 1  # one core per task: Ray runs as many tasks as cores
        self.max_retries, self.eval_gpu_fraction, self.eval_group = (
            max_retries,
            eval_gpu_fraction,
            eval_group,
        )
        self.cache_bytes, self.batch_size = cache_bytes, batch_size
        self._started_here = False
        self._watchdog = None

    def start(self):
        try:
            import ray
        except ImportError:
            raise FsbenchError(
                "the Ray runner needs ray: pip install 'ray>=2.9' (or use --serial)"
            ) from None
        self.ray = ray
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            kwargs = {
                "include_dashboard": False,
                "logging_level": "WARNING",
                "log_to_driver": True,
                "configure_logging": True,
            }
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    with _loopback_only(ray):
                        ray.init(
                            num_cpus=self.num_cpus,
                            _system_config={"enable_metrics_collection": False},
                            **kwargs,
                        )
                    self._watchdog = RayWatchdog(ray)
            except Exception as error:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise FsbenchError(f"could not start or join {where}: {error}") from None
            self._started_here = True
        return self

    def resources(self) -> dict:
        """What each task asks for: one GPU to train when the cluster has GPUs, else CPUs."""
        gpus = self.ray.cluster_resources().get("GPU", 0) if hasattr(self, "ray") else 0
        if gpus and self.device != "cpu":
            return {
                "train": {"num_gpus": 1, "num_cpus": 1},
                "eval": {"num_gpus": self.eval_gpu_fraction, "num_cpus": 1},
            }
        return {"train": {"num_cpus": self.threads}, "eval": {"num_cpus": self.threads}}

    def run(self, jobs: list[Job], driver: Driver) -> None:
        ray = self.ray
        resources = self.resources()
        train_remote = ray.remote(_train_with_state).options(
            num_returns=2, max_retries=self.max_retries, **resources["train"]
        )
        eval_remote = ray.remote(eval_task).options(
            max_retries=self.max_retries, **resources["eval"]
        )
        from ray.util.queue import Queue

        progress = Queue(actor_options={"num_cpus": 0}) if any(j.trainable for j in jobs) else None
        by_key = {job.key: job for job in jobs}

        def drain():
            while progress is not None and not progress.empty():
                key, point = progress.get_nowait()
                driver.on_progress(by_key[key], point)

        pending = {}
        for job in jobs:
            state_ref = None
            if job.trainable:
                state_ref, info_ref = train_remote.remote(
                    job.config, self.device, self.threads, progress, job.key
                )
                pending[info_ref] = ("train", job, state_ref)
            groups = [[item] for item in job.items] if self.eval_group == "seed" else [job.items]
            for group in groups:
                ref = eval_remote.remote(
                    job.config,
                    state_ref,
                    group,
                    self.device,
                    self.threads,
                    self.cache_bytes,
                    self.batch_size,
                )
                pending[ref] = ("eval", job, None)
        failed_jobs = set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            drain()
            if not ready:
                continue
            kind, job, state_ref = pending.pop(ready[0])
            if job.key in failed_jobs:
                continue
            try:
                if kind == "train":
                    info = ray.get(ready[0])
                    driver.on_train(job, info, ray.get(state_ref))
                else:
                    for output in ray.get(ready[0]):
                        driver.on_eval(job, output)
            except Exception as error:  # retries exhausted: report, keep the rest of the grid
                failed_jobs.add(job.key)
                driver.on_failure(job, _short_error(error))

    def stop(self):
        if self._started_here and self.ray.is_initialized():
            self.ray.shutdown()
        if self._watchdog is not None:
            self._watchdog.close()  # kills what a shutdown left behind
            self._watchdog = None


@contextmanager
def _loopback_only(ray):
    """A local Ray instance on 127.0.0.1 only: Ray binds its servers to the node address, and
    takes the loopback one when it is told it is not part of a cluster (its macOS/Windows
    default); otherwise GCS, raylet and workers listen on every interface."""
    import ray._private.ray_constants as constants

    variable = constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(variable), constants.ENABLE_RAY_CLUSTER
    os.environ[variable] = "0"  # for the processes Ray starts
    constants.ENABLE_RAY_CLUSTER = False  # for this one (already imported)
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved[0]


def _short_error(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def run_grid(
    grid: GridSpec, store: ResultStore, executor, tracker=None, rerun=False, progress=True
) -> Driver:
    """Plan, execute and record a grid; returns the driver (written and failed cells)."""
    plan = plan_grid(grid, store, rerun)
    store.write_plan(plan.cells, grid.compare)
    driver = Driver(grid, store, plan, tracker, progress)
    if tracker is not None:
        tracker.start_invocation(grid, plan, store)
    status = "KILLED"  # unless the executor returns: Ctrl-C, a lost cluster, a bug
    try:
        if plan.jobs:
            executor.run(plan.jobs, driver)
        status = "FAILED" if driver.failed else "FINISHED"
    finally:
        driver.close()
        if tracker is not None:
            tracker.finish_invocation(status)
    return driver
