"""Real components: a Ray head + worker node started with `ray start` (token auth, 127.0.0.1),
a real `mlflow server`, and killed processes. Every server is started and stopped here."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import session_members

from fsbench.benchmarks.tools.cluster import free_port

pytestmark = pytest.mark.slow

# Execution facts, not results: times, hosts, and how many images a task's cache had to encode.
VOLATILE = {
    "timings",
    "finished_at",
    "environment",
    "eval_seconds",
    "peak_rss_bytes",  # measured peaks of the task, like its times
    "spill_bytes",
    "seconds",
    "host",
    "pid",
    "device",
    "encoded_images",
    "resumed_from",
    "curve_times",
    "system",  # the sampled CPU / memory series of the training (the MLflow system metrics)
    "started_at",
    "ended_at",
}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_group(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster():
    """Head (1 CPU) + a second node (1 CPU) on this machine, token-authenticated."""
    if not shutil.which("ray"):
        pytest.fail("the `ray` command is missing: pip install -e .")
    temp = tempfile.mkdtemp(prefix="fsr", dir="/tmp")  # short: Ray's socket paths must fit
    port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    logs = Path(temp)
    started = []
    try:
        head = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=open(logs / "head.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(head)
        wait_for(lambda: "Ray runtime started" in (logs / "head.log").read_text(), 120, "Ray head")
        worker = subprocess.Popen(
            ["ray", "start", "--block", f"--address=127.0.0.1:{port}", "--num-cpus=1"],
            env=env,
            stdout=open(logs / "worker.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(worker)
        wait_for(
            lambda: "Ray runtime started" in (logs / "worker.log").read_text(),
            120,
            "Ray worker node",
        )
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        # Ray's daemons outlive `ray start --block` on SIGTERM, and some leave its process group:
        # note every process of the sessions we started, stop them, then kill those left, by PID.
        ours = session_members({process.pid for process in started})
        for process in reversed(started):
            _kill_group(process)
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory, voc_root):
    folder = tmp_path_factory.mktemp("grid")
    grid = {
        "name": "faults",
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "protocol": "panet",
        "input_size": 32,
        "episodes": 6,
        "seeds": [1, 2],
        "folds": [0, 1],
        "shots": [1],
        "methods": [{"name": "test_panet"}, {"name": "test_prototype_notrain"}],
        "train": {"steps": 150, "lr_milestones": [100], "log_every": 50},
        "checkpoint_every": 20,
    }
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def run_cli(args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "fsbench.benchmarks.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def scientific_content(results: Path) -> dict:
    """Every cell file without the fields that may differ between equal runs (times, hosts)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {
        p.name: strip(json.loads(p.read_text()))
        for p in sorted((results / "faults" / "cells").glob("*.json"))
    }


def checkpoints(results: Path) -> dict:
    import torch

    return {
        p.name: torch.load(p, weights_only=True)
        for p in sorted((results / "faults" / "checkpoints").glob("*.pt"))
    }


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="module")
def reference(grid_file, reference_dir):
    results = reference_dir
    done = run_cli(
        [
            "run",
            str(grid_file),
            "--serial",
            "--threads",  # as a Ray task: trained bits depend on the kernels' thread count
            "1",
            "--results",
            str(results),
            "--no-report",
            "--no-tracking",
        ]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    content = scientific_content(results)
    assert len(content) == 4
    return content


def test_one_worker_and_two_node_cluster_give_identical_results(
    ray_cluster, grid_file, reference, tmp_path
):
    one = tmp_path / "one"
    local = run_cli(
        [
            "run",
            str(grid_file),
            "--num-cpus",
            "1",
            "--results",
            str(one),
            "--no-report",
            "--no-tracking",
        ]
    )
    assert local.returncode == 0, local.stderr[-2000:]
    two = tmp_path / "two"
    cluster = run_cli(
        [
            "run",
            str(grid_file),
            "--ray-address",
            ray_cluster["address"],
            "--results",
            str(two),
            "--no-report",
        ],
        env=ray_cluster["env"],
    )
    assert cluster.returncode == 0, cluster.stderr[-2000:]
    hosts = {
        h
        for p in (two / "faults" / "cells").glob("*.json")
        for h in json.loads(p.read_text())["environment"]["hosts"]
    }
    assert hosts  # recorded where each cell ran
    assert scientific_content(one) == reference
    assert scientific_content(two) == reference


def test_worker_killed_mid_cell_is_retried_with_equal_results(
    ray_cluster, grid_file, reference, reference_dir, tmp_path
):
    from mlflow.tracking import MlflowClient

    results = tmp_path / "killed"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "run",
            str(grid_file),
            "--ray-address",
            ray_cluster["address"],
            "--results",
            str(results),
            "--no-report",
            "--quiet",
        ],
        env=ray_cluster["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def training_pids():
        found = subprocess.run(
            ["pgrep", "-f", "ray::_train_with_state"], capture_output=True, text=True
        ).stdout.split()
        return [int(pid) for pid in found]

    resume = results / "faults" / "resume"
    # Killed after a first resumable checkpoint (step 20 of 150): its retry resumes from it. Every
    # training dies (either may be the one that wrote it); one without a checkpoint restarts.
    wait_for(lambda: any(resume.glob("*.pt")), 120, "a training checkpoint")
    victims = training_pids()
    assert victims
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert scientific_content(results) == reference
    records = [json.loads(p.read_text()) for p in (results / "faults" / "cells").glob("*.json")]
    assert any((r["train"] or {}).get("resumed_from", 0) >= 20 for r in records)
    # The resumed weights are the uninterrupted run's, bit for bit; no resume state is left.
    ours, theirs = checkpoints(results), checkpoints(reference_dir)
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for name in ours:
        assert all(torch_equal(ours[name][k], theirs[name][k]) for k in theirs[name]), name
    assert not any(resume.glob("*"))
    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'cell'")
    assert len(runs) == 4 and len({r.data.tags["fsbench.cell_id"] for r in runs}) == 4


def test_driver_killed_mid_grid_then_rerun_finishes_only_missing_cells(
    ray_cluster, grid_file, reference, tmp_path
):
    results = tmp_path / "driver"
    command = [
        "run",
        str(grid_file),
        "--ray-address",
        ray_cluster["address"],
        "--results",
        str(results),
        "--no-report",
        "--quiet",
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "fsbench.benchmarks.cli", *command],
        env=ray_cluster["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cells = results / "faults" / "cells"
    wait_for(lambda: len(list(cells.glob("*.json"))) >= 1, 300, "a first finished cell")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert 1 <= len(survivors) < 4
    rerun = run_cli(command, env=ray_cluster["env"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{4 - len(survivors)} cells written, {len(survivors)} already done" in rerun.stdout
    assert {
        n: t
        for n, t in ((p.name, p.stat().st_mtime_ns) for p in cells.glob("*.json"))
        if n in survivors
    } == survivors  # finished cells untouched
    assert scientific_content(results) == reference


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; restartable on the same store."""
    from fsbench.benchmarks.tools.cluster import MlflowServer

    server = MlflowServer(tmp_path / "server", workers=1)
    with server:
        yield {"uri": server.uri, "start": server.start, "stop": server.stop}


def test_tracking_server_down_mid_grid_then_sync(mlflow_server, grid_file, tmp_path):
    from mlflow.tracking import MlflowClient

    results = tmp_path / "tracked"
    uri = mlflow_server["uri"]
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "run",
            str(grid_file),
            "--serial",
            "--results",
            str(results),
            "--tracking-uri",
            uri,
            "--no-report",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(uri)

    def cell_runs():
        experiment = client.get_experiment_by_name("faults")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'cell'")

    wait_for(
        lambda: len([r for r in cell_runs() if r.info.status == "FINISHED"]) >= 1,
        300,
        "a first logged cell",
    )
    mlflow_server["stop"]()
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert "unreachable" in output and "sync" in output
    assert len(list((results / "faults" / "cells").glob("*.json"))) == 4  # nothing lost

    mlflow_server["start"]()
    logged_before = len([r for r in cell_runs() if r.info.status == "FINISHED"])
    assert logged_before < 4
    sync = run_cli(["sync", "faults", "--results", str(results), "--tracking-uri", uri])
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert f"pushed {4 - logged_before} of 4" in sync.stdout
    runs = [r for r in cell_runs() if r.info.status == "FINISHED"]
    assert len(runs) == 4 and len({r.data.tags["fsbench.cell_id"] for r in runs}) == 4
    again = run_cli(["sync", "faults", "--results", str(results), "--tracking-uri", uri])
    assert "pushed 0 of 4" in again.stdout

    # What a user's tools read: the REST API of the server.
    import urllib.request

    def rest(path, body):
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    experiment = client.get_experiment_by_name("faults").experiment_id
    found = rest(
        "runs/search",
        {"experiment_ids": [experiment], "filter": "tags.`fsbench.kind` = 'cell'"},
    )["runs"]
    cells = {
        json.loads(p.read_text())["cell_id"]: json.loads(p.read_text())
        for p in (results / "faults" / "cells").glob("*.json")
    }
    assert len(found) == 4
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        cell = cells[tags["fsbench.cell_id"]]
        info = run["info"]
        # real times (ms): the run spans the cell's work, not the moment it was logged
        assert info["start_time"] == int(1000 * cell["timings"]["started_at"])
        assert info["end_time"] == int(1000 * cell["timings"]["ended_at"])
        assert tags["mlflow.source.git.commit"] == cell["environment"]["git_sha"]
        metrics = {m["key"]: m for m in run["data"]["metrics"]}
        assert metrics["miou"]["timestamp"] == info["end_time"]  # never 0 (1970)
        assert metrics["miou"]["value"] == round(100 * cell["summary"]["miou_mean"], 1)
        digests = {i["dataset"]["digest"] for i in run["inputs"]["dataset_inputs"]}
        assert digests == {s["manifest_fingerprint"][:16] for s in cell["seeds"]}


def test_ui_serves_the_results_store(tmp_path):
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "ui",
            "--port",
            str(port),
            "--results",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def answers():
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5",
                    timeout=2,
                ) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(answers, 120, "the MLflow UI")
        assert (tmp_path / "mlflow.db").is_file()  # the results store's sqlite backend
    finally:
        _kill_group(server)
