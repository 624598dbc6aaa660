"""Reliability, round three: the cases an adversarial user found that were scored silently,
executed code from data, hung, or wrote outside the folder in use — each refused with one line
naming the file or key and the fix (exit 2 where the input is wrong), nothing lost."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from helpers import cli, one_line_error
from PIL import Image, PngImagePlugin

from fsbench.benchmarks.store.records import CellRecord, RecordError
from fsbench.core import FsbenchError


@pytest.fixture
def voc(tmp_path):
    from fsbench.datasets.synthetic import write_voc

    write_voc(tmp_path / "voc", 120, 32, seed=1)
    return tmp_path / "voc" / "VOCdevkit" / "VOC2012"


# -- 1. an image and its label of different sizes ----------------------------------------------
def test_image_and_label_of_different_sizes_are_refused_at_indexing(voc, tmp_path):
    from fsbench.datasets.pascal import Pascal5i

    image_id = Pascal5i(voc, cache_dir=tmp_path / "a").list_ids("val")[0]
    path = voc / "JPEGImages" / f"{image_id}.jpg"
    with Image.open(path) as image:
        image.resize((64, 96)).save(path)  # 2× / 3× its 32×32 label
    with pytest.raises(FsbenchError, match=f"{image_id}.jpg: image is 64×96 but its mask"):
        Pascal5i(voc, cache_dir=tmp_path / "b").class_index("val")


def test_coco_image_of_another_size_than_its_annotation_is_refused(tmp_path):
    from fsbench.datasets.coco import Coco20i
    from fsbench.datasets.synthetic_coco import write_coco

    write_coco(tmp_path, 40, 32, seed=0)
    dataset = Coco20i(tmp_path, cache_dir=tmp_path / "index")
    image_id = dataset.list_ids("val")[0]
    path = tmp_path / "val2014" / dataset.class_index("val")["images"][image_id]
    with Image.open(path) as image:
        image.resize((64, 96)).save(path)
    with pytest.raises(FsbenchError, match="image is 64×96 but instances_val2014.json gives"):
        dataset.load_image(image_id)


# -- 2. the class index follows file content, not byte sizes ------------------------------------
def _pad_png(path: Path, size: int) -> None:
    """Rewrite a PNG with the same pixels and palette, padded (a text chunk) to `size` bytes."""
    with Image.open(path) as image:
        image.load()
    pad = size - path.stat().st_size - 14  # tEXt: length, type, "p", NUL, text, CRC
    info = PngImagePlugin.PngInfo()
    info.add_text("p", "x" * pad)
    image.save(path, pnginfo=info)
    assert path.stat().st_size == size


def test_swapped_equal_size_labels_rebuild_the_class_index(voc, tmp_path):
    from fsbench.datasets.pascal import Pascal5i

    first = Pascal5i(voc, cache_dir=tmp_path / "index")
    index = first.class_index("val")
    by_image = {}
    for class_id, images in index.items():
        for image_id in images:
            by_image.setdefault(image_id, set()).add(class_id)
    a, b = next((x, y) for x in by_image for y in by_image if by_image[x] != by_image[y])
    masks = voc / "SegmentationClassAug"
    size = max((masks / f"{i}.png").stat().st_size for i in (a, b)) + 200
    for image_id in (a, b):
        _pad_png(masks / f"{image_id}.png", size)
        os.utime(masks / f"{image_id}.png", ns=(10**18, 10**18))
    before = Pascal5i(voc, cache_dir=tmp_path / "index").class_index("val")
    # swap the two files (equal size, equal mtime: only their inodes tell them apart)
    os.rename(masks / f"{a}.png", masks / "swap.png")
    os.rename(masks / f"{b}.png", masks / f"{a}.png")
    os.rename(masks / "swap.png", masks / f"{b}.png")
    after = Pascal5i(voc, cache_dir=tmp_path / "index").class_index("val")
    fresh = Pascal5i(voc, cache_dir=tmp_path / "fresh").class_index("val")
    assert after == fresh and after != before
    assert {c for c, images in after.items() if a in images} == by_image[b]


# -- 3. YAML alias bombs ---------------------------------------------------------------------
BOMB = "\n".join(
    [
        'l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]',
        *(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7)),
    ]
)


@pytest.mark.parametrize(
    "where",
    [
        "dataset: {name: pascal5i, data_root: DATA, extra: *l6}",
        "methods: [{name: test_prototype_notrain, kwargs: {bomb: *l6}}]",
        "compare: [*l6]",
    ],
)
def test_yaml_alias_bomb_is_refused_in_a_blink(tmp_path, small_grid_dict, capsys, where):
    grid = dict(small_grid_dict, name="bomb")
    key = where.split(":")[0]
    grid.pop(key, None)
    text = yaml.safe_dump(grid) + BOMB + "\n" + where.replace("DATA", str(grid_data(grid)))
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    for command in (["config", path], ["run", path, "--dry-run", "--results", tmp_path / "r"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and one_line_error(err, "aliases (&anchor / *alias) expand it"), err
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "r").exists()


def grid_data(grid):
    return grid.get("dataset", {}).get("data_root", "/nowhere")


# -- 4. the whole cell record checked -------------------------------------------------------
@pytest.fixture
def finished_cell(quick_results):
    return sorted((quick_results / "quick" / "cells").glob("*.json"))[-1]


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["summary"].update(fb_iou_mean=0.99),
        lambda r: r["summary"].update(miou_std=0.5),
        lambda r: r["summary"].update(seeds=7),
        lambda r: r["summary"]["class_iou_mean"].update(
            {next(k for k, v in r["summary"]["class_iou_mean"].items() if v is not None): 0.99}
        ),
        lambda r: r["seeds"][0]["class_iou"].update(
            {next(k for k, v in r["seeds"][0]["class_iou"].items() if v is not None): 0.99}
        ),
        lambda r: r["seeds"][0].update(episodes=999),
    ],
    ids=["fb_iou_mean", "miou_std", "seeds", "class_iou_mean", "seed_class_iou", "episodes"],
)
def test_every_number_of_a_cell_file_is_checked(finished_cell, edit):
    raw = json.loads(finished_cell.read_text())
    CellRecord.read(finished_cell)  # as written: valid
    edit(raw)
    finished_cell.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match="edited"):
        CellRecord.read(finished_cell)


def test_an_edited_summary_never_reaches_the_class_table(
    tmp_path, quick_grid, finished_cell, capsys
):
    raw = json.loads(finished_cell.read_text())
    name = next(k for k, v in raw["summary"]["class_iou_mean"].items() if v is not None)
    raw["summary"]["class_iou_mean"][name] = 0.99
    finished_cell.write_text(json.dumps(raw))
    code, out, err = cli(capsys, "report", "quick", "--results", tmp_path / "r")
    assert code == 1 and "edited" in out + err  # the cell is rejected, named
    table = (tmp_path / "r" / "quick" / "report" / "table_class_iou.csv").read_text()
    assert "99.0" not in table


# -- 5. a copied results folder never writes into its origin -----------------------------------
@pytest.mark.slow
def test_copied_results_folder_logs_under_the_copy(tmp_path, quick_grid, capsys):
    origin, copy = tmp_path / "origin", tmp_path / "copy"
    code, _, err = cli(capsys, "run", quick_grid, "--serial", "--no-report", "--results", origin)
    assert code == 0, err
    shutil.copytree(origin, copy)
    shutil.rmtree(origin)
    code, _, err = cli(
        capsys, "run", quick_grid, "--serial", "--rerun", "--no-report", "--results", copy
    )
    assert code == 0, err
    assert "copied or moved" in err
    assert not origin.exists()  # nothing re-created at the origin
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quick")
    assert experiment.artifact_location.startswith((copy / "mlartifacts").as_uri())
    cells = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'cell'")
    assert len(cells) == 2
    for run in cells:
        assert run.info.artifact_uri.startswith(copy.as_uri())
    assert any((copy / "mlartifacts").rglob("*.json"))


# -- 6. a Ray address where nothing listens ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dead_ray_address_is_refused_in_seconds(tmp_path, quick_grid, capsys, monkeypatch):
    port = _free_port()
    started = time.perf_counter()
    code, _, err = cli(
        capsys, "run", quick_grid, "--ray-address", f"127.0.0.1:{port}", "--results", tmp_path
    )
    assert code == 2 and one_line_error(err, f"no Ray head answers at 127.0.0.1:{port}"), err
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    code, _, err = cli(capsys, "run", quick_grid, "--results", tmp_path)
    assert code == 2 and one_line_error(err, "no Ray head answers"), err
    assert time.perf_counter() - started < 30
    code, _, err = cli(capsys, "run", quick_grid, "--ray-address", "nohost", "--results", tmp_path)
    assert code == 2 and one_line_error(err, "is not HOST:PORT"), err


# -- 7. resume files are data ----------------------------------------------------------------
class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.parametrize("content", ["planted", "torn", "empty", "foreign"])
def test_a_bad_resume_file_is_never_run_and_is_moved_aside(tmp_path, content, capsys):
    import torch

    from fsbench.benchmarks.training.train import _load_resume

    path, marker = tmp_path / "resume" / "k.pt", tmp_path / "marker"
    path.parent.mkdir()
    if content == "planted":
        path.write_bytes(pickle.dumps({"model": _Planted(marker)}))
    elif content == "torn":
        torch.save({"step": 3, "model": {"w": torch.ones(100)}}, path)
        path.write_bytes(path.read_bytes()[:-40])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {}}, path)
    assert _load_resume(path) is None
    assert not marker.exists() and not path.exists()
    assert (path.parent / "k.pt.bad").is_file()
    err = capsys.readouterr().err
    assert "k.pt: not a usable resume file" in err and "training this cell from step 1" in err


# -- 8. a cell file never names code to run ----------------------------------------------------
def test_qualitative_never_imports_what_a_cell_file_names(
    tmp_path, quick_grid, finished_cell, capsys
):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    marker = tmp_path / "marker"
    (plugin / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    raw = json.loads(finished_cell.read_text())
    raw.update(imports=["evil_plugin"], plugin_paths=[str(plugin)])
    finished_cell.write_text(json.dumps(raw))
    CellRecord.read(finished_cell)  # numbers untouched: the record itself is valid
    cell_id = raw["cell_id"] if "cell_id" in raw else finished_cell.stem
    code, out, err = cli(
        capsys, "qualitative", "quick", "--cell", cell_id, "--results", tmp_path / "r"
    )
    assert code == 0 and out.strip().endswith(".png"), err
    assert not marker.exists()


# -- poor: COCO files that are not what pycocotools expects ----------------------------------
def _coco_edit(tmp_path, edit):
    from fsbench.datasets.coco import Coco20i
    from fsbench.datasets.synthetic_coco import write_coco

    write_coco(tmp_path, 40, 32, seed=0)
    path = tmp_path / "annotations" / "instances_val2014.json"
    raw = json.loads(path.read_text())
    victim = edit(raw)
    path.write_text(json.dumps(raw))
    return Coco20i(tmp_path, cache_dir=tmp_path / "index"), victim


def _ann(raw, kind):
    """The first annotation whose segmentation is a polygon list ('poly') or an RLE ('rle')."""
    return next(
        a
        for a in raw["annotations"]
        if isinstance(a["segmentation"], list) == (kind == "poly") and not a.get("iscrowd")
    )


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda r: _ann(r, "poly").pop("segmentation"), "lacks segmentation"),
        (lambda r: r["images"][0].pop("height"), "lacks height"),
        (lambda r: r.pop("categories"), "has no `categories` list"),
        (lambda r: r.pop("annotations"), "has no `annotations` list"),
        (lambda r: _ann(r, "poly").pop("area"), "lacks area"),
        (
            lambda r: r["images"].append(dict(r["images"][0], file_name="other.jpg")),
            "is listed twice",
        ),
        (lambda r: _ann(r, "poly").update(image_id=10**9), "not in `images`"),
    ],
    ids=["segmentation", "height", "categories", "annotations", "area", "twice", "orphan"],
)
def test_incomplete_coco_json_is_named(tmp_path, edit, says):
    dataset, _ = _coco_edit(tmp_path, edit)
    with pytest.raises(FsbenchError, match=says) as raised:
        dataset.class_index("val")
    assert "instances_val2014.json" in str(raised.value)


@pytest.mark.parametrize(
    "segmentation, says",
    [
        ([[1, 2]], "needs ≥ 3 (x, y) points"),
        ({"counts": "zz!!", "size": None}, "RLE size None"),
        ({"counts": [1, 2, 3], "size": "SIZE"}, "RLE counts do not cover"),
        ("bad", "not str"),
    ],
    ids=["polygon", "rle_size", "rle_counts", "string"],
)
def test_unusable_segmentation_names_its_annotation(tmp_path, segmentation, says):
    def edit(raw):
        ann = _ann(raw, "poly")
        image = next(i for i in raw["images"] if i["id"] == ann["image_id"])
        size = [image["height"], image["width"]]
        value = json.loads(json.dumps(segmentation).replace('"SIZE"', json.dumps(size)))
        ann["segmentation"] = value
        return ann

    dataset, ann = _coco_edit(tmp_path, edit)
    index = dataset.class_index("val")
    class_id = next(c for c, images in index["classes"].items() if str(ann["image_id"]) in images)
    with pytest.raises(FsbenchError, match=f"annotation {ann['id']} of image .*{re.escape(says)}"):
        dataset.load_masks(str(ann["image_id"]), [class_id])


# -- poor: grid files ------------------------------------------------------------------------
def test_include_takes_a_list_of_files(tmp_path, small_grid_dict, capsys):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(dict(small_grid_dict, episodes=3)))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"episodes": 5, "input_size": 40}))
    grid = tmp_path / "g.yaml"
    grid.write_text("include: [a.yaml, b.yaml]\nname: g\ninput_size: 48\n")
    from fsbench.benchmarks.grid import load_grid

    spec = load_grid(grid)
    assert (spec.episodes, spec.input_size, spec.name) == (5, 48, "g")
    grid.write_text("include: 5\n")
    code, _, err = cli(capsys, "config", grid)
    assert code == 2 and one_line_error(err, "include: 5 is not a grid file name"), err


@pytest.mark.parametrize("seed", [-5, 2**64])
def test_seeds_outside_32_bits_are_refused(tmp_path, small_grid_dict, capsys, seed):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(dict(small_grid_dict, protocol="hsnet", seeds=[seed])))
    code, _, err = cli(capsys, "config", path)
    assert code == 2 and one_line_error(err, f"seeds: {seed} is impossible"), err


def test_a_typo_in_dataset_keys_is_refused_before_anything_is_generated(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    grid = {
        "dataset": {"name": "synthetic_pascal5i", "n_imgaes": 50},
        "methods": ["all_background"],
    }
    path.write_text(yaml.safe_dump(grid))
    for command in (["config", path], ["run", path, "--serial", "--results", tmp_path / "r"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and one_line_error(err, "did you mean 'n_images'"), err
    assert not (tmp_path / "r").exists()


def test_two_released_checkpoints_of_one_method(tmp_path, small_grid_dict, capsys):
    import torch

    from fsbench.methods import METHODS

    for name in ("a.pt", "b.pt"):
        torch.manual_seed(len(name) + ord(name[0]))
        torch.save(METHODS.build("test_panet").state_dict(), tmp_path / name)
    methods = [
        {"name": "test_panet", "checkpoint": str(tmp_path / "a.pt"), "label": "release_a"},
        {"name": "test_panet", "checkpoint": str(tmp_path / "b.pt"), "label": "release_b"},
    ]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(dict(small_grid_dict, methods=methods)))
    code, out, err = cli(capsys, "config", path)
    assert code == 0 and "release_a" in out and "release_b" in out, err


@pytest.mark.parametrize(
    "body, says",
    [
        ("raise ValueError('boom')", "failed with ValueError('boom')"),
        ("import sys; sys.exit(3)", "failed with exit(3)"),
    ],
    ids=["raises", "exits"],
)
def test_a_broken_plugin_is_one_line(tmp_path, small_grid_dict, capsys, body, says):
    module = f"broken_plugin_{tmp_path.name}"  # one module per case: sys.path keeps growing
    (tmp_path / f"{module}.py").write_text(body + "\n")
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(dict(small_grid_dict, imports=[module])))
    code, _, err = cli(capsys, "config", path)
    assert code == 2 and one_line_error(err, says), err


def test_latex_escapes_every_special_character():
    from fsbench.benchmarks.report.tables import _latex_escape

    assert _latex_escape("x^2 {a} $5 ~b \\ 10% _") == (
        "x\\^{}2 \\{a\\} \\$5 \\textasciitilde{}b \\textbackslash{} 10\\% \\_"
    )


# -- poor: results, MLflow and locks ------------------------------------------------------------
def test_sync_of_a_grid_that_does_not_exist(tmp_path, quick_grid, finished_cell, capsys):
    results = tmp_path / "r"
    code, _, err = cli(capsys, "sync", "nosuchgrid", "--results", results)
    assert code == 2 and one_line_error(err, "no results for grid 'nosuchgrid'"), err
    assert "grids here: quick" in err
    assert not (results / "nosuchgrid").exists() and not (results / "mlflow.db").exists()
    code, _, err = cli(capsys, "sync", "--results", tmp_path / "empty")
    assert code == 2 and one_line_error(err, "no grid results to sync"), err


def test_a_tampered_manifest_never_gives_episode_rows_ids(tmp_path, finished_cell):
    from fsbench.benchmarks.tracking.cell_run import episode_rows

    record = CellRecord.read(finished_cell)
    manifests = tmp_path / "r" / "manifests"
    assert all(row["query"] for row in episode_rows(record, manifests))
    path = manifests / f"{record.seeds[0].manifest_fingerprint[:16]}.json"
    raw = json.loads(path.read_text())
    raw["episodes"][0]["query"] = ["2008_999999"]
    path.write_text(json.dumps(raw))
    rows = episode_rows(record, manifests)
    assert rows and not any(row["query"] for row in rows)


@pytest.mark.slow  # a subprocess importing fsbench
def test_an_orphaned_forked_child_does_not_hold_the_grid_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from fsbench.benchmarks.store.results import GridLock, ResultStore

    script = f"""
import os, time
from fsbench.benchmarks.store.results import GridLock, ResultStore
GridLock(ResultStore({str(tmp_path)!r}, "g"), "holder").__enter__()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(FsbenchError, match="is in use by `holder`"):
            GridLock(ResultStore(tmp_path, "g"), "second").__enter__()
        holder.kill()  # SIGKILL: the DataLoader-like child lives on
        holder.wait()
        with GridLock(ResultStore(tmp_path, "g"), "second"):
            pass  # taken at once
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


def test_an_interrupted_report_leaves_no_torn_files(tmp_path, finished_cell, capsys, monkeypatch):
    import matplotlib.figure

    report = tmp_path / "r" / "quick" / "report"
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    assert any(name.endswith(".pdf") for name in before)

    def torn_savefig(self, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"partial")
        else:
            Path(target).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_savefig)
    code, _, _ = cli(capsys, "report", "quick", "--results", tmp_path / "r")
    assert code == 130
    after = {p.name: p.read_bytes() for p in report.iterdir()}
    for name, content in after.items():
        assert content != b"partial" and content, name
        if name in before and name.endswith((".png", ".pdf")):
            assert content == before[name], name


@pytest.mark.slow
def test_sigterm_stops_a_ray_driver_like_ctrl_c(tmp_path, quick_grid):
    import signal
    import subprocess
    import sys

    from helpers import session_members

    grid = yaml.safe_load(quick_grid.read_text())
    grid.update(methods=["test_panet"], train={"steps": 100000, "lr_milestones": [99999]})
    quick_grid.write_text(yaml.safe_dump(grid))
    command = ["run", quick_grid, "--num-cpus", "1", "--no-tracking", "--no-report", "--quiet"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "fsbench.benchmarks.cli", *map(str, command)]
        + ["--results", str(tmp_path / "r")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            names = {
                Path(f"/proc/{p}/comm").read_text().strip()
                for p in set(session_members({driver.pid})) - {driver.pid}
                if Path(f"/proc/{p}/comm").exists()
            }
            # a worker running the training task (comm: 15 characters): the driver is past
            # ray.init, whose own SIGTERM handler fsbench replaces (an idle worker prestarted
            # during ray.init is no such sign on a loaded machine)
            if any(n.startswith("ray::_train") for n in names):
                break
            time.sleep(0.5)
        time.sleep(2)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=90)
        assert driver.returncode == 143, err[-2000:]
        assert "fsbench: terminated (SIGTERM); finished cells are saved" in err
        assert "SIGABRT" not in err and "*** " not in err, err[-2000:]
    finally:
        for pid in session_members({driver.pid}):  # ours, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


KILLER = """
import os, signal
from pathlib import Path

import torch.utils.data

from fsbench.datasets.pascal import Pascal5i
from fsbench.datasets.registry import DATASETS

MARKER = Path(__file__).with_name("killed_once")


class KilledOnce(Pascal5i):
    def load_image(self, image_id):
        if torch.utils.data.get_worker_info() is not None and not MARKER.exists():
            MARKER.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)  # what an OOM kill does to the loader child
        return super().load_image(image_id)


@DATASETS.register("killed_once_pascal5i")
def killed_once_pascal5i(data_root, **kwargs) -> KilledOnce:
    return KilledOnce(data_root, **kwargs)
"""


@pytest.mark.slow
def test_a_killed_dataloader_child_is_retried_on_ray(tmp_path, small_grid_dict, capsys):
    (tmp_path / "killer_plugin.py").write_text(KILLER)
    grid = dict(
        small_grid_dict,
        name="killed",
        imports=["killer_plugin"],
        dataset=dict(small_grid_dict["dataset"], name="killed_once_pascal5i"),
        seeds=[1],
        methods=["test_panet"],
        train_workers=1,
    )
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out, err = cli(
        capsys,
        "run",
        path,
        "--num-cpus",
        "1",
        "--max-retries",
        "2",
        "--no-tracking",
        "--no-report",
        "--quiet",
        "--results",
        tmp_path / "r",
    )
    assert (tmp_path / "killed_once").is_file()  # the child was killed once …
    assert code == 0 and "1 cells written" in out and "0 failed" in out, err  # … and retried


def test_a_refused_checkpoint_pickle_names_its_file_in_one_line(tmp_path):
    from fsbench.benchmarks.execution.executors import _short_error
    from fsbench.methods.weights import read_state_dict

    path, marker = tmp_path / "released.pt", tmp_path / "marker"
    path.write_bytes(pickle.dumps({"state_dict": _Planted(marker)}))
    with pytest.raises(FsbenchError) as raised:
        read_state_dict(path, "checkpoint", "check the path")
    assert not marker.exists()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: not a readable torch checkpoint")
    assert str(path) in _short_error(raised.value)  # what a Ray task failure prints
