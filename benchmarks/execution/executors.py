"""Executors run a plan's jobs (train, then evaluate) and hand every output to the driver:
`SerialExecutor` in this process, `RayExecutor` on a local or existing Ray cluster. Only this
module imports ray; how a grid runs never changes a number."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager

from fsbench.benchmarks.execution.driver import Driver
from fsbench.benchmarks.execution.graph import job_graph
from fsbench.benchmarks.execution.planning import Job
from fsbench.benchmarks.execution.tasks import available_cores, eval_task, train_task
from fsbench.benchmarks.execution.watchdog import RayWatchdog
from fsbench.core import FsbenchError, catch_sigterm


class SerialExecutor:
    """In-process, one job after another (tests, debugging, machines without Ray)."""

    name = "serial"

    def __init__(self, device="auto", threads=None, cache_bytes=2 << 30, batch_size=16):
        # In-process, one job at a time: use every core available to us unless told otherwise.
        self.device, self.threads = device, threads or available_cores()
        self.cache_bytes, self.batch_size = cache_bytes, batch_size

    def start(self) -> SerialExecutor:
        return self

    def stop(self) -> None:
        """Nothing to release: everything ran in this process."""

    def run(self, jobs: list[Job], driver: Driver) -> None:
        previous = _torch_threads()
        graph = job_graph(jobs)
        # weights kept while a later node needs them (its evaluations, a job starting from it)
        uses = Counter(node.needs for node in graph if node.needs is not None)
        states: dict[str, dict] = {}
        failed: dict[str, str] = {}
        try:
            for node in graph:
                job = node.job
                if job.key in failed:
                    continue
                if node.needs in failed and node.needs != job.key:
                    failed[job.key] = (
                        f"the model it starts from (init_from) failed: {failed[node.needs]}"
                    )
                    driver.on_failure(job, failed[job.key])
                    continue
                try:
                    if node.kind == "train":
                        info = train_task(
                            job.config,
                            self.device,
                            self.threads,
                            reporter=lambda point, job=job: driver.on_progress(job, point),
                            upstream_state=states.get(node.needs),
                        )
                        states[job.key] = info["state_dict"]
                        driver.on_train(job, info, states[job.key])
                    else:
                        for output in eval_task(
                            job.config,
                            states.get(job.key),
                            list(node.items),
                            self.device,
                            self.threads,
                            self.cache_bytes,
                            self.batch_size,
                        ):
                            driver.on_eval(job, output)
                except Exception as error:  # noqa: BLE001 - one broken job must not lose the rest
                    failed[job.key] = (
                        str(error)
                        if isinstance(error, FsbenchError)
                        else f"{type(error).__name__}: {error}"
                    )
                    driver.on_failure(job, failed[job.key])
                if node.needs is not None:
                    uses[node.needs] -= 1
                    if uses[node.needs] <= 0:
                        states.pop(node.needs, None)
        finally:
            _torch_threads(previous)


def _torch_threads(value=None):
    import torch

    if value is not None:
        torch.set_num_threads(value)
    return torch.get_num_threads()


def _train_with_state(config, device, threads, progress=None, key=None, upstream_state=None):
    """Ray task body: (state dict, info) as two objects, so evaluations fetch only the weights.
    `progress` (a Ray queue) carries the training curve to the driver as it is made;
    `upstream_state` is the weights of the model an `init_from` training starts from."""

    def report(point):
        try:
            progress.put_nowait((key, point))
        except Exception:  # noqa: BLE001 - progress is best effort; the curve is in the result
            pass

    try:
        info = train_task(
            config,
            device,
            threads,
            reporter=report if progress is not None else None,
            upstream_state=upstream_state,
        )
    except RuntimeError as error:
        if "DataLoader worker" in str(error):  # its episode loader was killed (OOM, a signal)
            raise WorkerLost(str(error).splitlines()[0]) from None
        raise
    # (`is not None`: an empty Ray queue is falsy — it has __len__ — and lost every live curve)
    return info.pop("state_dict"), info


class WorkerLost(RuntimeError):
    """A training task's DataLoader worker died (what an OOM kill hits): retried like a lost Ray
    worker, up to --max-retries, instead of failing the cell at once."""


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
        train_gpus=1,
    ):
        self.address, self.num_cpus, self.device = address, num_cpus, device
        self.train_gpus = train_gpus
        self.threads = threads or 1  # one core per task: Ray runs as many tasks as cores
        self.max_retries, self.eval_gpu_fraction, self.eval_group = (
            max_retries,
            eval_gpu_fraction,
            eval_group,
        )
        self.cache_bytes, self.batch_size = cache_bytes, batch_size
        self.ray = None  # the ray module, once start() imported it
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
            if address:
                check_ray_address(address)
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
            catch_sigterm()  # ray.init replaced it: SIGTERM must stop the driver as Ctrl-C does
        return self

    def resources(self) -> dict:
        """What each task asks for where the cluster has GPUs: whole GPUs to train (the grid's
        `train_gpus`), a share of one to evaluate (`eval_gpus`: several pack onto a GPU); CPUs
        only where it has none or the grid runs on the CPU (`device: cpu`)."""
        gpus = self.ray.cluster_resources().get("GPU", 0) if self.ray is not None else 0
        if gpus and self.device != "cpu":
            return {
                "train": {"num_gpus": self.train_gpus, "num_cpus": 1},
                "eval": {"num_gpus": self.eval_gpu_fraction, "num_cpus": 1},
            }
        return {"train": {"num_cpus": self.threads}, "eval": {"num_cpus": self.threads}}

    def run(self, jobs: list[Job], driver: Driver) -> None:
        ray = self.ray
        resources = self.resources()
        train_remote = ray.remote(_train_with_state).options(
            num_returns=2,
            max_retries=self.max_retries,
            retry_exceptions=[WorkerLost],  # a killed DataLoader child: retried as a lost worker
            **resources["train"],
        )
        eval_remote = ray.remote(eval_task).options(
            max_retries=self.max_retries, **resources["eval"]
        )
        from ray.util.queue import Queue

        progress = Queue(actor_options={"num_cpus": 0}) if any(j.trainable for j in jobs) else None
        by_key = {job.key: job for job in jobs}

        drained = 0.0

        def drain(now=False):
            """Live curve points, all queued ones in one call, at most once a second (each
            call is a round trip to the queue's actor), and always before a training's result
            is handled (its points were queued before it returned: they open its run)."""
            nonlocal progress, drained
            if progress is None or (not now and time.monotonic() - drained < 1.0):
                return
            drained = time.monotonic()
            try:
                points = progress.get_nowait_batch(progress.qsize())
            except ray.exceptions.RayError:  # its node was lost: live curves stop, results don't
                progress = None
                return
            for key, point in points:
                driver.on_progress(by_key[key], point)

        pending, refs = {}, {}
        for node in job_graph(jobs, self.eval_group):
            job = node.job
            if node.kind == "train":
                state_ref, info_ref = train_remote.remote(
                    job.config, self.device, self.threads, progress, job.key, refs.get(node.needs)
                )  # the upstream's weights as an object reference: Ray waits for them
                refs[job.key] = state_ref
                pending[info_ref] = ("train", job, state_ref)
                continue
            ref = eval_remote.remote(
                job.config,
                refs.get(job.key),
                list(node.items),
                self.device,
                self.threads,
                self.cache_bytes,
                self.batch_size,
            )
            pending[ref] = ("eval", job, None)
        failed_jobs = set()
        while pending:
            # The first result, then every other one ready by then in one more call (a call
            # per result scans the whole pending list: quadratic at thousands of tasks).
            refs = list(pending)
            ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            drain(now=any(pending[ref][0] == "train" for ref in ready))
            for ref in ready:
                kind, job, state_ref = pending.pop(ref)
                if job.key in failed_jobs:
                    continue
                try:
                    if kind == "train":
                        info = ray.get(ref)
                        driver.on_train(job, info, ray.get(state_ref))
                    else:
                        for output in ray.get(ref):
                            driver.on_eval(job, output)
                except Exception as error:  # retries exhausted: report, keep the rest
                    failed_jobs.add(job.key)
                    driver.on_failure(job, _short_error(error))

    def stop(self):
        if self._started_here and self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()
        if self._watchdog is not None:
            self._watchdog.close()  # kills what a shutdown left behind
            self._watchdog = None


RAY_PROBE_SECONDS = 5.0


def check_ray_address(address: str, timeout: float = RAY_PROBE_SECONDS) -> None:
    """Refuse at once an address where no Ray head listens: ray.init would wait for minutes,
    printing nothing and deaf to Ctrl-C. `auto`, `local` and ray:// client addresses are left
    to Ray (they name no GCS port to probe)."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FsbenchError(
            f"Ray address {address!r} is not HOST:PORT (the head's GCS address, e.g. "
            "10.0.0.5:6379, or `auto` on a cluster node)"
        )
    fix = (
        f"start it with `ray start --head --port {port}`, fix --ray-address / RAY_ADDRESS, "
        "or drop it to run on a local Ray instance"
    )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            answer = _http2_settings_answer(sock, timeout)
    except OSError as error:
        raise FsbenchError(
            f"no Ray head answers at {address} ({error.strerror or type(error).__name__} "
            f"within {timeout:.0f} s); {fix}"
        ) from None
    if not answer:
        raise FsbenchError(
            f"{address} accepts connections but is not a Ray head (no gRPC answer within "
            f"{timeout:.0f} s: another server holds that port); {fix}"
        )


def _http2_settings_answer(sock, timeout: float) -> bool:
    """Whether the server speaks HTTP/2 as Ray's GCS (a gRPC server) does: it answers the
    client preface with a SETTINGS frame. An HTTP/1 server answers text and a silent one
    nothing, where ray.init would wait through 30-second GCS timeouts for minutes."""
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    head, deadline = b"", time.monotonic() + timeout
    while len(head) < 9:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            chunk = sock.recv(9 - len(head))
        except TimeoutError:
            return False
        if not chunk:
            return False
        head += chunk
    return head[3] == 0x04 and head[5:9] == b"\x00\x00\x00\x00"  # SETTINGS on stream 0


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
