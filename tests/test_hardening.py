"""Bad input, hostile input, crashes and reruns: one clear line and exit 2 for what a user must
fix, nothing written outside --results, records (files, MLflow, reports) that stay true."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import cli, one_line_error, session_members

from fsbench.benchmarks.cli.main import main
from fsbench.core import FsbenchError


# -- grid files and overrides ------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, says",
    [
        ("shots=[1", "not valid YAML"),
        ("folds.x=1", "folds is [0], not a mapping"),
        ("protocol=[1]", "protocol: unknown [1]"),
        ("methods=[{kwargs: {}}]", "has no method name"),
        ("train.steps=2.5", "train.steps: 2.5 is not an integer"),
        ("train.lr=fast", "train.lr: 'fast' is not a number"),
        ("episodes=0", "episodes: 0 is impossible"),
        ("input_size=0", "input_size: 0 is impossible"),
        ("episodes=1000000000", "episodes: 1000000000 is impossible"),
        ("name=../../x", "grid name '../../x'"),
        ("name=/abs/path", "grid name '/abs/path'"),
        ("name=..", "grid name '..'"),
        ("train=5", "train: expected a mapping"),
        ("=3", "is not key=value"),
    ],
)
def test_bad_override_is_one_line_and_exit_2(tmp_path, quick_grid, capsys, override, says):
    code, _, err = cli(capsys, "run", quick_grid, override, "--results", tmp_path / "r")
    assert code == 2 and one_line_error(err, says), err
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()


def test_grid_name_of_an_included_file_cannot_leave_results(tmp_path, quick_grid, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**yaml.safe_load(quick_grid.read_text()), "name": "../out"}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"include": "base.yaml", "episodes": 4}))
    results = tmp_path / "deep" / "results"
    code, _, err = cli(capsys, "run", child, "--serial", "--no-tracking", "--results", results)
    assert code == 2 and one_line_error(err, "grid name '../out'")
    assert not (tmp_path / "deep" / "out").exists()


def test_numbers_in_yaml_and_overrides_are_what_users_mean(tmp_path, small_grid_dict):
    from fsbench.benchmarks.grid.files import load_grid

    grid_file = tmp_path / "g.yaml"
    text = yaml.safe_dump(small_grid_dict).replace(
        "train:", "train:\n  lr: 1e-3\n  weight_decay: 5E-4"
    )
    grid_file.write_text(text)
    grid = load_grid(grid_file)
    assert grid.train.lr == 0.001 and grid.train.weight_decay == 0.0005
    assert load_grid(grid_file, ["train.lr=2e-3"]).train.lr == 0.002
    # one method by name is the list of it, as users write it on the command line
    assert [m.name for m in load_grid(grid_file, ["methods=test_panet"]).methods] == ["test_panet"]


@pytest.mark.parametrize(
    "option", [["--num-cpus", "0"], ["--threads", "-1"], ["--max-retries", "-2"]]
)
def test_impossible_run_options_exit_2(tmp_path, quick_grid, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(quick_grid), *option, "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and one_line_error(err, f"argument {option[0]}: ")
    assert "impossible" in err


def test_results_or_data_root_that_is_a_file(tmp_path, quick_grid, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    code, _, err = cli(capsys, "run", quick_grid, "--serial", "--results", a_file)
    assert code == 2 and one_line_error(err, "is a file; --results must name a folder")
    code, _, err = cli(capsys, "report", "quick", "--results", a_file)
    assert code == 2 and one_line_error(err, "is a file")
    # a results folder that cannot be created: one line, before any cell runs
    code, _, err = cli(
        capsys, "run", quick_grid, "--serial", "--no-tracking", "--results", a_file / "sub"
    )
    assert code == 2 and one_line_error(err, "cannot write results there")
    # a generated dataset's data_root that is a file
    synthetic = tmp_path / "synthetic.yaml"
    synthetic.write_text(
        yaml.safe_dump(
            {
                "name": "syn",
                "dataset": {"name": "synthetic_pascal5i", "n_images": 40, "image_size": 32},
                "input_size": 32,
                "episodes": 2,
                "seeds": [1],
                "folds": [0],
                "shots": [1],
                "methods": ["all_background"],
            }
        )
    )
    code, _, err = cli(
        capsys,
        "run",
        synthetic,
        "--serial",
        "--no-tracking",
        "--results",
        tmp_path / "r",
        "--data-root",
        a_file,
    )
    assert code == 2 and one_line_error(err, "is a file; a generated dataset's data_root")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder(tmp_path, quick_grid, capsys):
    results = tmp_path / "ro"
    results.mkdir()
    results.chmod(0o555)
    try:
        code, out, err = cli(capsys, "run", quick_grid, "--serial", "--results", results)
    finally:
        results.chmod(0o755)
    assert code == 2 and one_line_error(err, "cannot write results there")
    assert "results are saved" not in out + err


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from fsbench.benchmarks.store import results

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full_disk)
    with pytest.raises(OSError):
        results.atomic_write_bytes(tmp_path / "cell.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_tracking_uri_password_never_printed(tmp_path, quick_grid, capsys):
    from fsbench.benchmarks.tracking.tracker import redacted

    assert redacted("http://ann:s3cret@host:5000/x") == "http://ann:***@host:5000/x"
    assert redacted("sqlite:///results/mlflow.db") == "sqlite:///results/mlflow.db"
    code, out, err = cli(
        capsys,
        "run",
        quick_grid,
        "methods=[all_background]",
        "--serial",
        "--no-report",
        "--results",
        tmp_path / "r",
        "--tracking-uri",
        "http://ann:s3cret@127.0.0.1:9/",  # discard port: nothing listens
    )
    assert code == 0 and "s3cret" not in out + err and "ann:***@127.0.0.1" in out + err


# -- datasets ------------------------------------------------------------------------------
def test_list_file_entries_cannot_leave_the_data_root(tmp_path):
    from fsbench.datasets.pascal import Pascal5i
    from fsbench.datasets.synthetic import write_voc

    write_voc(tmp_path, 30, 32, seed=0)
    listing = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text(listing.read_text() + "../../../../outside/secret\n")
    dataset = Pascal5i(tmp_path, cache_dir=tmp_path / "index")
    with pytest.raises(FsbenchError, match="'../../../../outside/secret' is not a plain file"):
        dataset.list_ids("val")


def test_coco_annotation_with_an_unknown_category(tmp_path):
    from fsbench.datasets.coco import Coco20i
    from fsbench.datasets.synthetic_coco import write_coco

    write_coco(tmp_path, 40, 32, seed=0)
    path = tmp_path / "annotations" / "instances_train2014.json"
    raw = json.loads(path.read_text())
    raw["annotations"][0]["category_id"] = 999
    path.write_text(json.dumps(raw))
    dataset = Coco20i(tmp_path, cache_dir=tmp_path / "index")
    with pytest.raises(FsbenchError, match="category_id 999, which is not among"):
        dataset.class_index("train")


def test_one_undecodable_image_fails_only_its_cells_in_serial(tmp_path, capsys):
    from fsbench.datasets.episodes import EpisodeManifest
    from fsbench.datasets.pascal import Pascal5i
    from fsbench.datasets.protocols import get_protocol
    from fsbench.datasets.synthetic import write_voc

    write_voc(tmp_path / "voc", 120, 32, seed=1)
    dataset = Pascal5i(tmp_path / "voc", cache_dir=tmp_path / "index")
    protocol = get_protocol("panet")

    def used(fold):
        manifest = EpisodeManifest.build(dataset, protocol, fold, 1, 1, 4, 1)
        return {i for e in manifest.episodes for i in (*sum(e.support, ()), *e.query)}

    victim = sorted(used(1) - used(0))[0]
    (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{victim}.jpg").write_bytes(
        b"not a jpeg"
    )
    grid = {
        "name": "bad_image",
        "dataset": {"name": "pascal5i", "data_root": str(tmp_path / "voc")},
        "input_size": 32,
        "episodes": 4,
        "seeds": [1],
        "folds": [0, 1],
        "shots": [1],
        "methods": ["test_prototype_notrain"],
    }
    grid_file = tmp_path / "bad.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    results = tmp_path / "r"
    code, out, err = cli(
        capsys, "run", grid_file, "--serial", "--no-tracking", "--results", results
    )
    assert code == 1, err
    assert "1 cells written" in out and "1 failed" in out and victim in err
    (cell,) = [json.loads(p.read_text()) for p in (results / "bad_image" / "cells").glob("*.json")]
    assert cell["config"]["fold"] == 0


# -- checkpoints, manifests, reports -------------------------------------------------------
def test_damaged_checkpoint_is_named_and_retrained(tmp_path, small_grid_dict, capsys):
    grid_file = tmp_path / "ck.yaml"
    grid_file.write_text(
        yaml.safe_dump(dict(small_grid_dict, name="ck", seeds=[1], methods=["test_panet"]))
    )
    results = tmp_path / "r"
    args = ["run", grid_file, "--serial", "--no-tracking", "--no-report", "--results", results]
    assert cli(capsys, *args)[0] == 0
    (cell_file,) = (results / "ck" / "cells").glob("*.json")
    checkpoint = results / "ck" / json.loads(cell_file.read_text())["checkpoint"]
    original = checkpoint.read_bytes()
    checkpoint.write_bytes(bytes(len(original)))  # same size, wrong bytes
    code, _, err = cli(capsys, "qualitative", "ck", "--results", results)
    assert code == 2 and one_line_error(err, "is corrupt")
    checkpoint.unlink()
    code, _, err = cli(capsys, "qualitative", "ck", "--results", results)
    assert code == 2 and one_line_error(err, "is missing")
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "1 cells written, 0 already done" in out
    assert checkpoint.read_bytes() == original  # retrained to the same weights


def _run_quick(capsys, quick_grid, results, *extra):
    code, out, err = cli(capsys, "run", quick_grid, "--serial", "--results", results, *extra)
    assert code == 0, err
    return out, err


def test_report_shows_only_valid_cells_of_its_grid(tmp_path, quick_grid, capsys):
    results = tmp_path / "r"
    _run_quick(capsys, quick_grid, results, "--no-tracking", "--no-report")
    cells = results / "quick" / "cells"
    real = sorted(cells.glob("*.json"))
    record = json.loads(real[0].read_text())
    stray = dict(record, summary=dict(record["summary"], miou_mean=0.99))
    stray["seeds"] = [dict(s, miou=0.99) for s in record["seeds"]]
    (cells / "copy.json").write_text(json.dumps(stray))
    (cells / real[0].name).write_text(json.dumps(stray))  # edited in place
    (cells / "truncated.json").write_text(real[1].read_text()[:200])
    (cells / "empty.json").write_text("{}")
    (cells / "list.json").write_text("[]")
    other = dict(record, grid="another")
    other["cell_id"] = "0123456789abcdef"
    (cells / "0123456789abcdef.json").write_text(json.dumps(other))
    code, out, err = cli(capsys, "report", "quick", "--results", results)
    assert code == 1  # rejected files: said, and the exit status says so
    for name, why in [
        ("copy.json", "is not its file name"),
        (real[0].name, "is not what its per-episode counts give"),
        ("truncated.json", "unreadable"),
        ("empty.json", "result version None"),
        ("list.json", "not a cell record"),
        ("0123456789abcdef.json", "a cell of grid 'another'"),
    ]:
        said = [line for line in err.splitlines() if f"left out cells/{name}:" in line]
        assert len(said) == 1 and why in said[0], (name, err)
    assert "cells of the grid have no valid result" in err and "fold 0 · 1-shot" in err
    table = (results / "quick" / "report" / "table_miou.md").read_text()
    edited_row = json.loads(real[0].read_text())["config"]["row"]
    assert "99.0 ±" not in table and f"| {edited_row} |" not in table


def test_report_never_writes_a_dataset(tmp_path, quick_grid, capsys):
    results = tmp_path / "r"
    synthetic = {"name": "synthetic_pascal5i", "n_images": 40, "image_size": 32}
    grid = yaml.safe_load(quick_grid.read_text())
    grid.update(dataset=synthetic, methods=["test_prototype_notrain"])
    quick_grid.write_text(yaml.safe_dump(grid))
    _run_quick(capsys, quick_grid, results, "--no-tracking", "--no-report")
    (cell_file,) = (results / "quick" / "cells").glob("*.json")
    cell = json.loads(cell_file.read_text())
    elsewhere = tmp_path / "must-not-exist"
    cell["config"]["dataset"]["data_root"] = str(elsewhere)  # a results folder from elsewhere
    cell_file.write_text(json.dumps(cell))
    code, _, err = cli(capsys, "report", "quick", "--results", results)
    assert code == 0 and "qualitative figure skipped" in err
    assert not elsewhere.exists()


# -- locks -----------------------------------------------------------------------------------
def test_second_writer_of_a_grid_is_told_who_holds_it(tmp_path, quick_grid, capsys):
    from fsbench.benchmarks.store.results import GridLock, ResultStore

    results = tmp_path / "r"
    with GridLock(ResultStore(results, "quick"), "the first run"):
        code, _, err = cli(capsys, "run", quick_grid, "--serial", "--results", results)
        assert code == 2 and one_line_error(err, "is in use by `the first run` (pid")
        code, _, err = cli(capsys, "sync", "quick", "--results", results)
        assert code == 2 and one_line_error(err, "is in use by `the first run`")
    assert not (results / "quick" / "cells").exists()  # nothing computed twice


# -- MLflow ----------------------------------------------------------------------------------
def _client(results):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    return client, client.get_experiment_by_name("quick").experiment_id


def _runs(client, experiment, kind):
    return client.search_runs(
        [experiment], f"tags.`fsbench.kind` = '{kind}'", run_view_type=3, max_results=1000
    )


@pytest.mark.slow
def test_mlflow_tells_the_truth_after_reruns_and_crashes(tmp_path, quick_grid, capsys):
    from fsbench.benchmarks.store.records import CellRecord
    from fsbench.benchmarks.tracking.tracker import record_digest

    results = tmp_path / "r"
    _run_quick(capsys, quick_grid, results, "--no-report")
    client, experiment = _client(results)
    cells = {
        json.loads(p.read_text())["cell_id"]: json.loads(p.read_text())
        for p in (results / "quick" / "cells").glob("*.json")
    }
    invocations = len(_runs(client, experiment, "invocation"))

    # a no-op rerun leaves no empty parent run
    _run_quick(capsys, quick_grid, results, "--no-report")
    assert len(_runs(client, experiment, "invocation")) == invocations

    # --rerun: the cell files are new, and MLflow follows them (old numbers do not survive)
    (stale,) = [r for r in _runs(client, experiment, "cell") if r.info.lifecycle_stage == "active"][
        :1
    ]
    client.log_metric(stale.info.run_id, "miou", 0.99)
    _run_quick(capsys, quick_grid, results, "--no-report", "--rerun")
    cells = {
        json.loads(p.read_text())["cell_id"]: json.loads(p.read_text())
        for p in (results / "quick" / "cells").glob("*.json")
    }
    active = [r for r in _runs(client, experiment, "cell") if r.info.lifecycle_stage == "active"]
    assert len(active) == len(cells) and all(r.info.status == "FINISHED" for r in active)
    for run in active:
        cell = cells[run.data.tags["fsbench.cell_id"]]
        record = CellRecord.from_json(cell)
        assert record.to_json() == cell  # a record reads and writes back to the same file
        assert run.data.tags["fsbench.record"] == record_digest(record)
        assert run.data.metrics["miou"] == round(100 * cell["summary"]["miou_mean"], 1)

    # a killed driver's leftovers: RUNNING invocation and cell runs, repaired by the next `run`
    killed = client.create_run(
        experiment, tags={"fsbench.kind": "invocation", "fsbench.results": str(results.resolve())}
    )
    victim = next(iter(cells))
    half = client.create_run(
        experiment,
        tags={"fsbench.kind": "cell", "fsbench.cell_id": victim, "fsbench.record": "x"},
    )
    for run in active:  # as if the driver died before logging this cell at all
        if run.data.tags["fsbench.cell_id"] == victim:
            client.delete_run(run.info.run_id)
    _run_quick(capsys, quick_grid, results, "--no-report")
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(half.info.run_id).info.status != "RUNNING"
    finished = [
        r
        for r in _runs(client, experiment, "cell")
        if r.info.lifecycle_stage == "active" and r.data.tags["fsbench.cell_id"] == victim
    ]
    assert [r.info.status for r in finished] == ["FINISHED"]
    assert not [r for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")]


def test_interrupted_invocation_is_recorded_killed(tmp_path, quick_grid):
    from fsbench.benchmarks.execution.runner import run_grid
    from fsbench.benchmarks.grid.files import load_grid
    from fsbench.benchmarks.store.results import ResultStore
    from fsbench.benchmarks.tracking.tracker import Tracker

    class Interrupted:
        def run(self, jobs, driver):
            raise KeyboardInterrupt

    results = tmp_path / "r"
    grid = load_grid(quick_grid)
    tracker = Tracker(f"sqlite:///{results}/mlflow.db", results, "quick")
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, ResultStore(results, "quick"), Interrupted(), tracker, progress=False)
    client, experiment = _client(results)
    (invocation,) = _runs(client, experiment, "invocation")
    assert invocation.info.status == "KILLED"


@pytest.mark.slow
def test_corrupt_tracking_store_and_manifest_degrade_then_repair(tmp_path, quick_grid, capsys):
    results = tmp_path / "r"
    results.mkdir()
    (results / "mlflow.db").write_bytes(b"this is not a sqlite database" * 100)
    out, err = _run_quick(capsys, quick_grid, results, "--no-report")
    assert "2 cells written" in out and "Traceback" not in err
    assert "unreachable" in err and "sync quick" in out
    (results / "mlflow.db").unlink()
    manifest = next((results / "manifests").glob("*.json"))
    manifest.write_text('{"episodes": [')  # damaged
    # New processes, as a user's next commands (MLflow caches a store per URI and process).
    sync = subprocess.run(
        [sys.executable, "-m", "fsbench.benchmarks.cli", "sync", "quick", "--results", results],
        capture_output=True,
        text=True,
    )
    assert sync.returncode == 0 and "pushed 2 of 2" in sync.stdout, sync.stderr
    _run_quick(capsys, quick_grid, results, "--no-report", "--no-tracking")  # rewrites it
    from fsbench.datasets.episodes import EpisodeManifest

    assert EpisodeManifest.load(manifest).fingerprint.startswith(manifest.stem)


# -- Ray ---------------------------------------------------------------------------------------
def _listening(pids: set[int]) -> list[str]:
    """Local addresses the processes listen on (TCP), from `ss`."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [
        line.split()[3] for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)
    ]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("ss"), reason="needs `ss` (iproute2) to list sockets")
def test_local_ray_listens_on_loopback_and_dies_with_its_driver(tmp_path, quick_grid):
    grid = yaml.safe_load(quick_grid.read_text())
    # a training far longer than the test: the driver is killed while Ray works
    grid.update(methods=["test_panet"], train={"steps": 100000, "lr_milestones": [99999]})
    quick_grid.write_text(yaml.safe_dump(grid))
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "run",
            str(quick_grid),
            "--num-cpus",
            "1",
            "--no-tracking",
            "--no-report",
            "--quiet",
            "--results",
            str(tmp_path / "r"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            members = set(session_members({driver.pid})) - {driver.pid}
            names = {
                Path(f"/proc/{p}/comm").read_text().strip()
                for p in members
                if Path(f"/proc/{p}/comm").exists()
            }
            if "raylet" in names and any(n.startswith("ray::RuntimeEnv") for n in names):
                break
            time.sleep(0.5)
        time.sleep(3)
        members = set(session_members({driver.pid}))
        addresses = _listening(members)
        assert addresses, "no Ray listener found"
        assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in addresses), (
            addresses
        )
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as an OOM killer would
        driver.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and session_members({driver.pid}):
            time.sleep(0.5)
        left = session_members({driver.pid})
        assert not left, [Path(f"/proc/{p}/cmdline").read_text()[:80] for p in left]
    finally:
        for pid in session_members({driver.pid}):  # ours, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
