"""A local Ray instance dies with its driver: a watchdog process kills what the driver started
(Ray's agents outlive a SIGKILL-ed driver, still listening, ignoring SIGTERM)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

# Run by a separate process: reads "pid start-time" lines until its stdin closes (the driver
# exited, however it exited), waits a grace period for Ray's own shutdown (none after a "now"
# line: the driver shut Ray down already), then SIGKILLs the listed processes still alive
# (the start time guards against a reused pid).
_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
lines = [line.split() for line in sys.stdin]
if not lines or lines[-1] != ["now"]:
    time.sleep(float(sys.argv[1]))
for pid, start in (line for line in lines if len(line) == 2):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[19] == start:
                os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pids: set[int]) -> set[int]:
    """`pids` and every process below them (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(parents.get(pid, ()))
    return found


class RayWatchdog:
    """Makes a local Ray instance die with its driver. Ray's agents (DashboardAgent,
    RuntimeEnvAgent) outlive a SIGKILL-ed driver, still listening and ignoring SIGTERM; a small
    process in its own session watches the driver through a pipe and kills them."""

    GRACE_SECONDS = 3.0

    def __init__(self, ray):
        self.process = None
        if not os.path.isdir("/proc"):  # not Linux: nothing to watch with
            return
        node = ray._private.worker._global_node
        roots = {p.process.pid for procs in node.all_processes.values() for p in procs}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.GRACE_SECONDS)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal must not reach it
        )
        time.sleep(0.5)  # the raylet starts its agents right after it is up
        lines = []
        for pid in sorted(_descendants(roots) - {os.getpid()}):
            start = _start_time(pid)
            if start is not None:
                lines.append(f"{pid} {start}\n")
        self.process.stdin.write("".join(lines).encode())
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.write(b"now\n")
            self.process.stdin.close()
            self.process.wait()
            self.process = None
