"""Reliability, round four: the cases a careless or hostile user of a shared results folder found
(issue 38) — each ends with one line naming the problem and the fix (exit 2 for wrong input, 1
for failed cells), nothing lost, nothing written outside --results, no wrong number recorded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cli, one_line_error
from PIL import Image

from fsbench.core import FsbenchError
from fsbench.methods import METHODS


def _save_weights(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(METHODS.build("test_panet").state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- bad: a checkpoint replaced between the grid's parse and the weight load --------------------
def test_a_checkpoint_swapped_after_the_parse_is_refused_never_scored_under_the_old_digest(
    tmp_path, small_grid_dict, capsys, monkeypatch
):
    from fsbench.benchmarks.grid import entries

    weights = tmp_path / "w.pt"
    digest_a = _save_weights(weights, 1)
    _save_weights(tmp_path / "b.pt", 2)
    original = entries._checkpoint

    def parse_then_swap(entry):  # `cp B w.tmp && mv w.tmp w.pt` once the grid was read
        found = original(entry)
        if found and (tmp_path / "b.pt").exists():
            os.replace(tmp_path / "b.pt", weights)
        return found

    monkeypatch.setattr(entries, "_checkpoint", parse_then_swap)
    grid = dict(
        small_grid_dict, seeds=[1], methods=[{"name": "test_panet", "checkpoint": str(weights)}]
    )
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    results = tmp_path / "r"
    code, out, err = cli(capsys, "run", path, "--serial", "--no-tracking", "--results", results)
    assert code == 1, err
    assert "changed since the grid was read" in out + err and digest_a[:12] in out + err
    assert not list(results.glob("tiny/cells/*.json"))  # no cell holds B's numbers under A's id


def test_read_state_dict_hashes_the_bytes_it_loads(tmp_path):
    from fsbench.methods.weights import read_state_dict

    path = tmp_path / "w.pt"
    digest = _save_weights(path, 1)
    assert read_state_dict(path, "checkpoint", "fix", sha256=digest)  # the same bytes: loads
    _save_weights(path, 2)
    with pytest.raises(FsbenchError, match="changed since the grid was read"):
        read_state_dict(path, "checkpoint", "fix", sha256=digest)


# -- bad: NaN / inf settings --------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, says",
    [
        ("train.lr=.nan", "train.lr: NaN or infinity"),
        ("train.momentum=.inf", "train.momentum: NaN or infinity"),
        ("methods=[{name: test_panet, kwargs: {alpha: .inf}}]", "methods.0.kwargs.alpha: NaN"),
        ("methods=[{name: test_panet, sweep: {alpha: [1, .nan]}}]", "sweep.alpha.1: NaN"),
    ],
)
def test_non_finite_settings_are_refused(quick_grid, capsys, tmp_path, override, says):
    code, _, err = cli(capsys, "run", quick_grid, override, "--serial", "--results", tmp_path)
    assert code == 2 and one_line_error(err, says), err
    assert not (tmp_path / "quick").exists()


def test_score_kwargs_infinite_unparseable_or_code_are_one_line(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    _save_weights(weights, 1)
    base = ["score", "--method", "test_panet", "--checkpoint", weights, "--dataset", "pascal5i"]
    base += ["--fold", "0", "--results", tmp_path / "r"]
    for kwarg, says in [
        ("alpha=.inf", "NaN or infinity is not a setting"),
        ("alpha=[1", "the value is not valid YAML"),
        ("alpha=!!python/object/apply:os.system ['true']", "the value is not valid YAML"),
    ]:
        code, _, err = cli(capsys, *base, "--kwarg", kwarg)
        assert code == 2 and one_line_error(err, says), (kwarg, err)
    code, _, err = cli(capsys, *base[:4], tmp_path, *base[5:])
    assert code == 2 and one_line_error(err, "is a directory"), err


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"width": float("nan")}, "NaN or infinity"),
        ({"alpha": "twenty"}, "kwarg alpha='twenty' is not a finite number"),
    ],
)
def test_method_kwargs_of_the_wrong_kind_are_one_line(small_grid_dict, kwargs, says):
    from fsbench.benchmarks.grid.files import parse_grid

    grid = dict(small_grid_dict, methods=[{"name": "panet", "kwargs": kwargs}])
    with pytest.raises(FsbenchError, match=says):
        parse_grid(grid)


def test_a_kwarg_of_another_kind_names_the_kwarg_and_its_default():
    from fsbench.benchmarks.grid.entries import _check_kwargs

    _check_kwargs("pfenet", {"layers": 101, "vgg": False})  # kwargs that fit
    _check_kwargs("panet", {"width": 1, "alpha": 10.5})  # an int where a float is wanted: fine
    for name, kwargs, says in [
        (
            "panet",
            {"width": [1, 2]},
            "kwarg width=[1, 2] is not a finite number (its default is 1.0)",
        ),
        ("pfenet", {"layers": 3.5}, "kwarg layers=3.5 is not an integer (its default is 50)"),
        ("pfenet", {"vgg": "yes"}, "kwarg vgg='yes' is not true or false"),
        ("hsnet", {"backbone": 50}, "kwarg backbone=50 is not a string"),
    ]:
        with pytest.raises(FsbenchError, match=re.escape(says)):
            _check_kwargs(name, kwargs)


# -- bad: a display name that forges a table row; `<script>` in names ---------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("display", "All foreground\n| PANet (ours, forged) | **99.9 ± 0.0** |"),
        ("display", "<script>alert(1)</script>"),
        ("label", "<img src=x onerror=alert(1)>"),
        ("display", "a | b"),
    ],
)
def test_names_that_would_become_markup_are_refused(quick_grid, capsys, tmp_path, key, value):
    grid = yaml.safe_load(quick_grid.read_text())
    grid["methods"] = [{"name": "all_background", key: value}]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, _, err = cli(capsys, "run", path, "--serial", "--results", tmp_path / "r")
    assert code == 2 and one_line_error(err, f"{key} "), err
    assert "one line of plain text" in err


def test_markdown_tables_escape_what_a_name_could_forge():
    from fsbench.benchmarks.report.tables import markdown_text

    forged = markdown_text("x\n| PANet | **99.9** | <b>")
    assert "\n" not in forged and "|" not in forged.replace("\\|", "")
    assert "<" not in forged and "**" not in forged


# -- bad: report/ linked outside the results folder; a read-only folder --------------------------
@pytest.fixture
def reported(quick_results):
    return quick_results


def test_a_report_folder_linked_outside_is_refused(reported, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    report = reported / "quick" / "report"
    shutil.rmtree(report)
    report.symlink_to(outside)
    code, _, err = cli(capsys, "report", "quick", "--results", reported)
    assert code == 2 and one_line_error(err, "outside the results folder"), err
    assert list(outside.iterdir()) == []


def test_a_report_that_cannot_be_written_is_one_line(reported, capsys, monkeypatch):
    from fsbench.benchmarks.report import build

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Operation not permitted", str(reported / "quick" / "report"))

    monkeypatch.setattr(build, "_build_report", refuse)  # what chattr +i gives even root
    code, _, err = cli(capsys, "report", "quick", "--results", reported)
    assert code == 2 and one_line_error(err, "cannot write the report"), err
    assert "Operation not permitted" in err and "make" in err


# -- bad: a Ray address at a port that is not Ray ----------------------------------------------
@pytest.mark.slow  # a 5 s probe timeout for the silent socket
def test_a_port_that_is_not_ray_fails_fast(quick_grid, capsys, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        http_port = int(http.stdout.readline().split("port ")[1].split()[0])
        for port in (silent.getsockname()[1], http_port):
            started = time.perf_counter()
            address = f"127.0.0.1:{port}"
            code, _, err = cli(
                capsys, "run", quick_grid, "--ray-address", address, "--results", tmp_path
            )
            assert code == 2 and one_line_error(err, "accepts connections but is not a Ray"), err
            assert time.perf_counter() - started < 20
    finally:
        silent.close()
        http.kill()
        http.wait()


# -- bad and poor: the scale benchmark's arguments ---------------------------------------------
@pytest.mark.parametrize(
    "args, says",
    [
        (["--nodes", "0"], "--nodes 0: must be at least 1"),
        (["--nodes", "-3"], "--nodes -3: must be at least 1"),
        (["--cells", "-1"], "--cells -1: each size must be at least 8"),
        (["--eval-gpus", "0"], "--eval-gpus 0.0: a GPU share > 0"),
        (["--step-seconds", "-1"], "--step-seconds -1.0: a time of 0 seconds or more"),
        (["--out", "/etc/passwd"], "--out /etc/passwd: exists and is not a folder"),
    ],
)
def test_impossible_scale_arguments_are_one_line(args, says, capsys):
    from fsbench.benchmarks.tools.scale import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith(f"scale: error: {says}"), err
    assert len(err.splitlines()) == 1


def test_a_failed_cluster_start_leaves_no_temp_folder(monkeypatch):
    from fsbench.benchmarks.tools import cluster

    cluster_ = cluster.LocalCluster(1, 1, 1)
    monkeypatch.setattr(cluster_, "_start_all", lambda: (_ for _ in ()).throw(RuntimeError("x")))
    assert cluster_.temp.is_dir()
    with pytest.raises(RuntimeError):
        cluster_.__enter__()
    assert not cluster_.temp.exists()


# -- poor: huge values in errors; hints that do not fit ---------------------------------------
def test_an_error_quoting_a_huge_value_stays_short(quick_grid, capsys, tmp_path):
    names = ",".join(["nope"] * 60_000)
    code, _, err = cli(
        capsys, "run", quick_grid, f"eval_protocols=[{names}]", "--results", tmp_path
    )
    assert code == 2 and one_line_error(err, "eval_protocols"), err[:300]
    assert len(err) < 800


def test_a_bool_setting_given_words_gets_no_number_hint():
    from fsbench.benchmarks.grid.recipes import TrainConfig

    with pytest.raises(FsbenchError) as refused:
        TrainConfig.from_dict({"exclude_novel_images": "yes please"})
    assert "true or false" in str(refused.value) and "1e-3" not in str(refused.value)


# -- poor: non-finite weights -------------------------------------------------------------------
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    from fsbench.methods.weights import read_state_dict

    state = METHODS.build("test_panet").state_dict()
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(FsbenchError, match=f"tensor {name} holds .* NaN/inf"):
        read_state_dict(tmp_path / "nan.pt", "checkpoint", "fix")


# -- poor: the novel-image filter that thins or empties a class ---------------------------------
def _filter_case(voc_tmp: Path) -> Path:
    """A tiny VOC layout where every training image of class 7 (fold 0's base) also holds a
    pixel of fold 0's class 1, so BAM's filter empties class 7."""
    from fsbench.datasets.synthetic import write_voc

    write_voc(voc_tmp, 80, 32, seed=3)
    root = voc_tmp / "VOCdevkit" / "VOC2012"
    for label in (root / "SegmentationClassAug").glob("*.png"):
        with Image.open(label) as image:
            values = np.array(image)
            palette = image.getpalette()
        if (values == 7).any():
            values[0, 0] = 1  # one novel-class pixel
            picture = Image.fromarray(values, mode="P")
            picture.putpalette(palette)
            picture.save(label)
    return voc_tmp


def test_the_filter_emptying_a_class_is_one_line_naming_the_filter(tmp_path, capsys):
    voc = _filter_case(tmp_path / "voc")
    grid = {
        "name": "filt",
        "dataset": {"name": "pascal5i", "data_root": str(voc)},
        "input_size": 32,
        "episodes": 2,
        "seeds": [1],
        "folds": [0],
        "shots": [1],
        "methods": ["test_panet"],
        "train": {"steps": 2, "lr_milestones": [1], "exclude_novel_images": True},
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out, err = cli(
        capsys, "run", path, "--serial", "--no-tracking", "--results", tmp_path / "r"
    )
    text = out + err
    assert code == 1, text
    assert "train class 7 has 0 image(s) left" in text and "exclude_novel_images removed" in text
    assert "Traceback" not in text


# -- poor: a resume file of another model -------------------------------------------------------
def test_a_resume_file_of_another_model_is_moved_aside(tmp_path, dataset, capsys):
    from fsbench.benchmarks.grid.recipes import TrainConfig
    from fsbench.benchmarks.training.train import RESUME_KEYS, train
    from fsbench.datasets.protocols import get_protocol

    resume = tmp_path / "resume.pt"
    other = torch.nn.Linear(2, 2).state_dict()  # well-formed, of another model
    torch.save({k: other for k in RESUME_KEYS} | {"optimizer": {}, "step": 1}, resume)
    cfg = TrainConfig.from_dict({"steps": 2, "lr_milestones": [1], "log_every": 1})
    model = METHODS.build("test_panet")
    result = train(
        model, dataset, get_protocol("panet"), 0, 1, 1, cfg, 32,
        resume_path=resume, checkpoint_every=0,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "a resume file of another model" in err and "moved to resume.pt.bad" in err
    assert (tmp_path / "resume.pt.bad").is_file() and result.resumed_from in (None, 0)
    assert len(result.curve) >= 1


# -- poor: failures inside DataLoader workers are one line --------------------------------------
def test_a_dataloader_worker_error_is_reported_as_its_last_line():
    from fsbench.benchmarks.execution.driver import failure_line

    wrapped = (
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "a.py", line 1, in f\n    raise DatasetError("x")\n'
        "fsbench.datasets.pascal.DatasetError: /cache/idx.json: the class index is gone; rerun"
    )
    assert failure_line(wrapped) == "DatasetError: /cache/idx.json: the class index is gone; rerun"


# -- poor: CLI paths of the wrong kind; the leakage tool --------------------------------------
def test_manifest_output_that_is_a_folder_is_one_line(voc_root, tmp_path, capsys):
    code, _, err = cli(
        capsys, "manifest", "--dataset", "pascal5i", "--data-root", voc_root, "--fold", "0",
        "--episodes", "2", "--output", tmp_path,
    )  # fmt: skip
    assert code == 2 and one_line_error(err, "is a folder; name the manifest file"), err


@pytest.mark.parametrize(
    "args, says",
    [
        (["--folds", "7"], "--folds 7: PASCAL-5i folds are 0, 1, 2 and 3"),
        (["--folds", "-1"], "--folds -1"),
        (["--data-root", "/nonexistent/voc"], "dataset folder does not exist"),
    ],
)
def test_the_leakage_tool_says_one_line(args, says, capsys):
    from fsbench.benchmarks.tools.leakage import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("leakage: error:") and says in err, err
    assert len(err.splitlines()) == 1


def test_the_leakage_tool_names_a_mask_with_foreign_labels(tmp_path, capsys):
    from fsbench.benchmarks.tools.leakage import main
    from fsbench.datasets.synthetic import write_voc

    write_voc(tmp_path / "v", 40, 32, seed=1)
    label = sorted((tmp_path / "v/VOCdevkit/VOC2012/SegmentationClassAug").glob("*.png"))[0]
    with Image.open(label) as image:
        values, palette = np.array(image), image.getpalette()
    values[:2, :2] = 77
    picture = Image.fromarray(values, mode="P")
    picture.putpalette(palette)
    picture.save(label)
    with pytest.raises(SystemExit):
        main(["--data-root", str(tmp_path / "v"), "--folds", "0"])
    err = capsys.readouterr().err
    assert label.name in err and "[77]" in err and len(err.strip().splitlines()) == 1


# -- poor: sync says which cell it left out ----------------------------------------------------
@pytest.mark.slow  # runs a whole grid
def test_sync_names_a_rejected_cell(quick_grid, tmp_path, capsys):
    results = tmp_path / "r"
    code, _, err = cli(capsys, "run", quick_grid, "--serial", "--no-report", "--results", results)
    assert code == 0, err
    cell = sorted((results / "quick" / "cells").glob("*.json"))[0]
    record = json.loads(cell.read_text())
    record["summary"]["miou"] = 0.99  # edited by hand
    cell.write_text(json.dumps(record))
    (results / "mlflow.db").unlink()  # a fresh store: sync pushes every valid cell
    code, out, err = cli(capsys, "sync", "--results", results)
    assert code == 1, out + err
    assert f"left out cells/{cell.name}" in err


# -- round three's leftovers -------------------------------------------------------------------
def test_labels_edited_with_their_mtimes_put_back_rebuild_the_class_index(tmp_path):
    from fsbench.datasets.pascal import Pascal5i
    from fsbench.datasets.synthetic import write_voc

    write_voc(tmp_path / "v", 40, 32, seed=1)
    root = tmp_path / "v" / "VOCdevkit" / "VOC2012"
    before = Pascal5i(root, cache_dir=tmp_path / "idx").class_index("trainaug")
    label = sorted((root / "SegmentationClassAug").glob("*.png"))[0]
    stat = label.stat()
    with Image.open(label) as image:
        values, palette = np.array(image), image.getpalette()
    present = {int(v) for v in np.unique(values)} - {0, 255}
    target = next(c for c in range(1, 21) if c not in present)
    values[(values >= 1) & (values <= 20)] = target  # relabelled in place, same size
    picture = Image.fromarray(values, mode="P")
    picture.putpalette(palette)
    picture.save(label)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `touch -r`: mtime put back
    time.sleep(0.01)
    after = Pascal5i(root, cache_dir=tmp_path / "idx").class_index("trainaug")
    assert label.stem in after[target] and label.stem not in before[target]


def test_an_edited_manifest_is_never_drawn_as_the_cells_episodes(tmp_path):
    from fsbench.datasets.manifests import EpisodeManifest, EpisodeSpec

    manifest = EpisodeManifest({"dataset": "x"}, (EpisodeSpec((1,), (("a",),), ("b",)),))
    path = manifest.save(tmp_path / "m.json")
    raw = json.loads(path.read_text())
    raw["episodes"][0]["query"] = ["EDITED_9999"]
    raw.pop("fingerprint")  # the edit removed the file's own fingerprint too
    path.write_text(json.dumps(raw))
    with pytest.raises(FsbenchError, match="not the ones the cell was scored on"):
        EpisodeManifest.load_scored(path, manifest.fingerprint)


def test_the_report_skips_the_qualitative_figure_of_an_edited_manifest(reported, capsys):
    manifests = sorted((reported / "manifests").glob("*.json"))
    assert manifests
    for path in manifests:
        raw = json.loads(path.read_text())
        raw["episodes"][0]["query"] = ["EDITED_9999"]
        raw.pop("fingerprint")
        path.write_text(json.dumps(raw))
    (reported / "quick" / "report" / "qualitative.png").unlink(missing_ok=True)
    code, _, err = cli(capsys, "report", "quick", "--results", reported)
    assert "qualitative figure skipped" in err and "not the ones the cell was scored on" in err
    assert not (reported / "quick" / "report" / "qualitative.png").exists()
