"""Local servers for the cluster-scale benchmark (scale.py): a multi-node Ray cluster with
declared GPUs (`ray start`, token auth, 127.0.0.1), a real `mlflow server` and a real PostgreSQL
to back it (a lab's shared setup). Every process is stopped by its process group or its own
control command, never by pattern."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """A Ray head (no task slots) and `nodes` nodes with declared GPUs, started with `ray start`
    on 127.0.0.1; every process is stopped by its process group, never by pattern."""

    def __init__(self, nodes: int, gpus_per_node: int, cpus_per_node: int):
        self.nodes, self.gpus, self.cpus = nodes, gpus_per_node, cpus_per_node
        self.temp = Path(tempfile.mkdtemp(prefix="fss", dir="/tmp"))  # short socket paths
        self.port = free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.processes: list[subprocess.Popen] = []
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.temp / f"{name}.log"
        process = subprocess.Popen(
            ["ray", "start", "--block", *args],
            env=self.env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                lines = [line for line in log.read_text().splitlines() if line.strip()]
                raise RuntimeError(
                    f"ray start ({name}) failed: {lines[-1] if lines else 'no output'}"
                )
            time.sleep(0.2)
        self.processes.append(process)
        return process

    def __enter__(self):
        try:
            self._start_all()
        except BaseException:
            self.__exit__(None, None, None)  # a failed start leaves no process and no folder
            raise
        return self

    def _start_all(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=false",
                f"--temp-dir={self.temp}",
                "--disable-usage-stats",
            ],
        )
        for index in range(self.nodes):
            self._start(
                f"node{index}",
                [
                    f"--address={self.address}",
                    f"--num-cpus={self.cpus}",
                    f"--num-gpus={self.gpus}",
                ],
            )

    def kill_node(self, index: int = 1) -> None:
        """SIGKILL one node's processes (its raylet, object store and workers)."""
        os.killpg(self.processes[1 + index].pid, signal.SIGKILL)

    def __exit__(self, *exc):
        self._stop_processes()
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's sessions, sockets and logs

    def _stop_processes(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def postgres_binaries() -> tuple[Path | None, str]:
    """(the folder of PostgreSQL's server programs, "") or (None, why they cannot be used)."""
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    if found is None:
        return None, "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    folder = Path(found).resolve().parent
    if not (folder / "pg_ctl").exists():
        return None, f"{folder} has initdb but no pg_ctl"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None, "PostgreSQL refuses to run as root and there is no 'postgres' user"
        if shutil.which("runuser") is None:
            return None, "PostgreSQL refuses to run as root and runuser is missing"
    try:
        import psycopg2  # noqa: F401 - MLflow's PostgreSQL driver
    except ImportError:
        return None, "MLflow's PostgreSQL driver is missing: pip install 'fsbench[postgres]'"
    return folder, ""


class LocalPostgres:
    """A real PostgreSQL server on 127.0.0.1 (initdb into a new folder under /tmp, pg_ctl
    start/stop, the folder removed after), with a database `mlflow` for an MLflow backend store;
    as root it runs as the 'postgres' user (who must be able to reach its folder)."""

    def __init__(self):
        # (/tmp, not $TMPDIR: the 'postgres' user must be able to reach it, and its socket
        # path must stay short)
        self.folder = Path(tempfile.mkdtemp(prefix="fsbench-pg-", dir="/tmp"))
        self.port = free_port()
        self.binaries, self.problem = postgres_binaries()
        self.uri = f"postgresql+psycopg2://fsbench@127.0.0.1:{self.port}/mlflow"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.binaries / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise RuntimeError(f"PostgreSQL {program} failed: {lines[-1]}")

    def start(self) -> LocalPostgres:
        if self.binaries is None:
            raise RuntimeError(self.problem)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        data = str(self.folder / "data")
        self._run("initdb", "-D", data, "-U", "fsbench", "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder}"
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "fsbench", "mlflow")
        return self

    def stop(self) -> None:
        if self.binaries is not None and (self.folder / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
            except RuntimeError as error:
                print(f"fsbench: {error}", file=sys.stderr)
                return  # (a server that did not stop keeps its folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts (clients upload over HTTP, as
    with a lab's server), backed by an sqlite file in `folder` or by `backend` (e.g. a
    PostgreSQL URI); restartable on the same port and store."""

    def __init__(self, folder: Path, workers: int = 2, backend: str | None = None):
        self.folder, self.workers, self.port = Path(folder), workers, free_port()
        self.backend = backend or f"sqlite:///{self.folder}/server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--backend-store-uri",
                self.backend,
                "--artifacts-destination",
                (self.folder / "artifacts").as_uri(),
            ],  # fmt: skip
            stdout=open(self.folder / "server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"mlflow server did not start: {self.folder}/server.log"
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM its process group (SIGKILL after 15 s)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
