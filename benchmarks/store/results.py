"""`results/<grid>/`: the source of truth, one atomically written JSON per finished cell."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from fsbench.benchmarks.store.records import CellRecord, read_cells
from fsbench.core import FsbenchError, atomic_write_bytes


def default_results_root() -> Path:
    """`$FSBENCH_RESULTS`, else ./results (the repository's results/ when run from its root)."""
    return Path(os.environ.get("FSBENCH_RESULTS", "results")).expanduser().resolve()


@lru_cache(maxsize=1)
def environment() -> dict:
    """Code version and package versions, recorded with every result."""
    source = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    sha, dirty = sha or "unknown", bool(status)
    versions = {}
    for package in ("fsbench", "torch", "torchvision", "numpy", "ray", "mlflow", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def file_sha256(path: Path) -> str:

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=256)
def _cached_sha256(path: Path, mtime_ns: int) -> str:
    """A checkpoint's digest, computed once per file version and process (a model's cells share
    one checkpoint)."""
    return file_sha256(path)


class ResultStore:
    """Paths and atomic writes under one grid's results folder."""

    def __init__(self, results_root: Path, grid_name: str):
        self.root = Path(results_root).resolve()
        self.grid_dir = self.root / grid_name
        self.cells_dir = self.grid_dir / "cells"
        self.checkpoints_dir = self.grid_dir / "checkpoints"
        self.manifests_dir = self.root / "manifests"

    def cell_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def finished_ids(self, records: list[CellRecord] | None = None) -> set[str]:
        """Cells whose file is valid and whose checkpoint (if they have one) is intact: a
        deleted, truncated or corrupted checkpoint makes its cells run again."""
        records = self.load_cells() if records is None else records
        return {r.cell_id for r in records if self.checkpoint_problem(r, True) is None}

    def checkpoint_problem(self, record: CellRecord, full: bool = False) -> str | None:
        """Why the cell's checkpoint is unusable (None if it is fine or the cell has none);
        `full` also compares its sha256 with the one recorded at training."""
        if not record.checkpoint:
            return None
        path = self.grid_dir / record.checkpoint
        if not path.is_file():
            return f"checkpoint {path} is missing"
        size = record.checkpoint_bytes
        if size is not None and path.stat().st_size != size:
            return f"checkpoint {path} has {path.stat().st_size} bytes, not the {size} written"
        digest = record.checkpoint_sha256
        if full and digest and _cached_sha256(path, path.stat().st_mtime_ns) != digest:
            return f"checkpoint {path} is corrupt (its sha256 differs from the one written)"
        return None

    def load_cells(self, rejected: dict | None = None) -> list[CellRecord]:
        """Every valid cell file of the grid (a torn, foreign or edited file is left out, never
        fatal; `rejected` collects why)."""
        return read_cells(self.cells_dir, self.grid_dir.name, rejected)

    def write_cell(self, record: CellRecord) -> Path:
        path = self.cell_path(record.cell_id)
        atomic_write_bytes(path, json.dumps(record.to_json(), indent=1, sort_keys=True).encode())
        return path

    def write_plan(self, cells, compare=(), seed_summary: str = "mean") -> Path:
        """The cells the grid's latest run planned (the report names those lacking a result),
        the comparisons it declares and how its tables summarise the test seeds."""
        path = self.grid_dir / "plan.json"
        plan = {
            "cells": [{"id": c.id, "title": c.title} for c in cells],
            "compare": [list(pair) for pair in compare],
            **({"seed_summary": seed_summary} if seed_summary != "mean" else {}),
        }
        atomic_write_bytes(path, json.dumps(plan, indent=1).encode())
        return path

    def resume_path(self, key: str) -> Path:
        """Where a training in progress keeps its resumable state (removed once it finished)."""
        return self.grid_dir / "resume" / f"{key}.pt"

    def save_checkpoint(self, key: str, state_dict: dict) -> Path:
        import torch

        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        path = self.checkpoints_dir / f"{key}.pt"
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def save_manifest(self, manifest) -> Path:
        """Write the manifest unless an intact copy is there (a corrupt one is rewritten)."""
        from fsbench.datasets.episodes import EpisodeManifest

        path = self.manifests_dir / f"{manifest.fingerprint[:16]}.json"
        if path.exists():
            try:
                if EpisodeManifest.load(path).fingerprint == manifest.fingerprint:
                    return path
            except FsbenchError:
                pass
        manifest.save(path)
        return path


class GridLock:
    """One writer per results folder and grid: an exclusive `flock` on `<grid>/.lock`, which
    names its holder. The kernel drops it when the holder exits, however it exits (no stale
    locks after SIGKILL). A second writer gets one line naming the holder (exit 2)."""

    def __init__(self, store: ResultStore, what: str):
        self.path = store.grid_dir / ".lock"
        self.store, self.what, self._fd = store, what, None

    def __enter__(self):
        try:
            self.store.grid_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise FsbenchError(
                f"{self.store.grid_dir}: cannot write results there ({error.strerror}); fix the "
                "folder's permissions or choose another with --results"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FsbenchError(
                f"grid {self.store.grid_dir.name!r} in {self.store.root} is in use by "
                f"{holder or 'another fsbench process'}; wait for it to finish (or stop it), "
                "then run this again"
            ) from None
        _HELD_LOCKS.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"`{self.what}` (pid {os.getpid()} on {socket.gethostname()}, since "
            f"{now_iso()})".encode(),
            0,
        )
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the lock
            self._fd = None


# Descriptors of the grid locks this process holds. A forked child (a DataLoader worker) closes
# its copies at once: a flock belongs to the open file, so a child orphaned by a SIGKILLed driver
# would otherwise keep the grid locked until it noticed and exited. Closing a copy never releases
# the parent's lock. (Exec'd children — Ray workers — never get it: the fd is close-on-exec.)
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
