"""System metrics of a worker task: a background thread samples the process's CPU use and
resident memory, the machine's memory in use and, with CUDA, the device's memory and
utilisation, every few seconds. The series travels back with the task's result and becomes the
`system/…` metrics of the cell's and training's MLflow runs (the UI's System metrics tab).

Read from /proc and the process's own clocks: no extra dependency (psutil is not required)."""

from __future__ import annotations

import os
import threading
import time

import torch

# A series never grows past this many samples: when full, every other sample is dropped and the
# interval doubles (an hour-long training keeps a readable, bounded curve in its record).
MAX_SAMPLES = 240


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _memory_used_percent() -> float | None:
    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0])
        return 100.0 * (1 - fields["MemAvailable"] / fields["MemTotal"])
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None


def _gpu(index: int) -> dict[str, float]:
    out = {f"gpu_{index}_memory_usage_megabytes": torch.cuda.memory_allocated(index) / 2**20}
    try:  # needs NVML (pynvml); absent, the utilisation is simply not sampled
        out[f"gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
    except Exception:  # noqa: BLE001 - any NVML failure only drops this one value
        pass
    return out


class SystemSampler:
    """`with SystemSampler() as sampler: …` then `sampler.samples`: [{"time": epoch ms,
    name: value, …}], MLflow's system metric names without the `system/` prefix."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self._last = (time.monotonic(), time.process_time())

    def sample(self) -> dict:
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._last[0]
        values: dict = {"time": int(time.time() * 1000)}
        if wall > 0:  # the process's CPU time over the wall time since the last sample
            values["cpu_utilization_percentage"] = 100.0 * (cpu - self._last[1]) / wall
        self._last = (now, cpu)
        rss = _rss_bytes()
        if rss is not None:
            values["process_memory_rss_megabytes"] = rss / 2**20
        used = _memory_used_percent()
        if used is not None:
            values["system_memory_usage_percentage"] = used
        for index in range(self._gpus):
            values.update(_gpu(index))
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())
            if len(self.samples) >= MAX_SAMPLES:
                self.samples = self.samples[1::2]
                self.interval *= 2

    def __enter__(self) -> SystemSampler:
        self._last = (time.monotonic(), time.process_time())
        self._thread = threading.Thread(target=self._run, name="fsbench-system", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(self.sample())  # the last moment, so a short task has one point
