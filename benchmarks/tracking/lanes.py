"""MLflow logging lanes (mixed into Tracker): one thread each, so a tracking server or a
database server that serves requests in parallel is fed in parallel, while the driver only
queues; a model's training run and its cells share a lane, in order. An sqlite file takes one
writer at a time: one lane."""

from __future__ import annotations

import hashlib
import os
import queue
import threading

from fsbench.benchmarks.tracking.cell_run import local_store
from fsbench.core import FsbenchError

WORKERS_VARIABLE = "FSBENCH_MLFLOW_WORKERS"


def logging_workers(uri: str) -> int:
    """Logging lanes for a tracking URI: $FSBENCH_MLFLOW_WORKERS, else 1 for an sqlite file or
    a folder (one writer at a time; more threads only contend for the lock and the GIL) and 4
    for a server or a database server (each request waits on the network, not on the CPU)."""
    value = os.environ.get(WORKERS_VARIABLE, "").strip()
    if value:
        try:
            if int(value) >= 1:
                return int(value)
        except ValueError:
            pass
        raise FsbenchError(
            f"{WORKERS_VARIABLE}={value!r}: not a number of logging threads; set a whole number "
            "of 1 or more, or unset it"
        )
    return 1 if local_store(uri) else 4


class LoggingLanes:
    """Uses the tracker's `workers`, `_lanes`, `_next_lane`, `_lock`, `available`, `pending`
    and `_log_now`."""

    def _submit(self, function, *args, lane: str | None = None) -> None:
        """Run `function(*args)` on a logging lane (started on first use): `lane`'s own (a
        model key: its training run's points, its end, then its cells, in order), or the next
        in turn."""
        with self._lock:
            if not self._lanes:
                for index in range(self.workers):
                    work = queue.Queue()
                    thread = threading.Thread(
                        target=self._drain,
                        args=(work,),
                        name=f"fsbench-mlflow-{index}",
                        daemon=True,
                    )
                    thread.start()
                    self._lanes.append((work, thread))
            if lane is None:
                index, self._next_lane = self._next_lane, self._next_lane + 1
            else:
                index = int(hashlib.sha1(lane.encode()).hexdigest()[:8], 16)
            self._lanes[index % len(self._lanes)][0].put((function, args))

    def _drain(self, work: queue.Queue) -> None:
        while (item := work.get()) is not None:
            function, args = item
            if self.available:
                function(*args)
            elif function == self._log_now:
                self._count_pending()

    def _count_pending(self) -> None:
        with self._lock:
            self.pending += 1

    def flush(self) -> None:
        """Wait until every queued cell is logged (or counted as pending)."""
        with self._lock:
            lanes, self._lanes = self._lanes, []
        for work, _ in lanes:
            work.put(None)
        for _, thread in lanes:
            thread.join()
