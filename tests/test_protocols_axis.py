"""One model under every lineage's protocol (`eval_protocols`), and what every number depends on."""

import json

import pytest

from fsbench.benchmarks.grid.files import parse_grid
from fsbench.core import FsbenchError
from fsbench.datasets.protocols import PROTOCOLS


def _grid(small_grid_dict, **changes):
    return parse_grid({**small_grid_dict, **changes})


def test_eval_protocols_triple_the_cells_and_keep_one_model_each(small_grid_dict):
    plain = _grid(small_grid_dict).expand()
    raw = {k: v for k, v in small_grid_dict.items() if k not in ("seeds", "episodes")}
    axis = _grid(raw, eval_protocols=["panet", "pfenet", "hsnet"], episodes=6).expand()
    assert len(axis) == 3 * len(plain)
    # the cells under the training protocol keep their ids: adding the axis recomputes nothing
    home = [c for c in axis if not c.eval_protocol]
    assert {c.id for c in home} == {c.id for c in _grid(raw, episodes=6).expand()}
    by_model = {}
    for cell in axis:
        by_model.setdefault(cell.model_key(), []).append(cell)
    assert len(by_model) == len(home)  # one model per (method, fold, shot), three scorings each
    for cells in by_model.values():
        assert sorted(c.eval_protocol or c.protocol for c in cells) == ["hsnet", "panet", "pfenet"]
        for cell in cells:
            scored = PROTOCOLS[cell.eval_protocol or cell.protocol]
            assert cell.preset.name == scored.name
            assert cell.seeds == scored.seeds  # each protocol's own test seeds (not set)
            assert cell.input_size == 32  # the grid's input size applies under every protocol
            assert cell.sampler == "official"
            assert (cell.trained_as is None) == (cell.eval_protocol == "")
    assert len({c.id for c in axis}) == len(axis)
    titles = [c.title for c in axis if c.eval_protocol == "pfenet"]
    assert titles and all("[pfenet protocol]" in t for t in titles)


@pytest.mark.parametrize(
    "value, says",
    [(["panet", "nope"], "nope"), (["hsnet", "hsnet"], "distinct"), ([], "distinct")],
)
def test_bad_eval_protocols_are_one_line(small_grid_dict, value, says):
    with pytest.raises(FsbenchError, match=says):
        _grid(small_grid_dict, eval_protocols=value)


def test_a_protocol_whose_input_size_a_method_cannot_take_is_named(small_grid_dict):
    raw = {k: v for k, v in small_grid_dict.items() if k != "input_size"}
    methods = [{"name": "pfenet", "kwargs": {"pretrained": False, "blocks": [1, 1, 1, 1]}}]
    grid = parse_grid({**raw, "protocol": "pfenet", "methods": methods,
                       "eval_protocols": ["pfenet", "hsnet"]})  # fmt: skip
    with pytest.raises(FsbenchError, match="protocol hsnet's input size 400"):
        grid.expand()


def test_depends_on_states_each_switch(small_grid_dict):
    from fsbench.benchmarks.grid.provenance import DEPENDS_ON_KEYS, depends_on

    cells = _grid(small_grid_dict, eval_protocols=["panet", "pfenet"]).expand()
    panet = next(c for c in cells if c.method.name == "test_panet" and not c.eval_protocol)
    pfenet = next(c for c in cells if c.method.name == "test_panet" and c.eval_protocol)
    facts, other = depends_on(panet), depends_on(pfenet)
    assert list(facts) == list(DEPENDS_ON_KEYS)
    assert facts["input_size"] == "32 px (square resize)"
    assert other["input_size"] == "32 px (keep_ratio_pad resize)"
    assert facts["score_resolution"].startswith("input") and "original" in other["score_resolution"]
    assert facts["episodes_x_seeds"] == "6 × 2 (seeds 1, 2)"
    assert "PANet's" in facts["iou_aggregation"] and "PANet's" not in other["iou_aggregation"]
    assert facts["checkpoint_rule"] == "last step (4 steps)"
    assert facts["test_time_augmentation"] == "none" and facts["coco_split"] == "n/a"
    assert facts["trained_under"] == other["trained_under"] == "panet protocol"
    untrained = next(c for c in cells if c.method.name == "all_background")
    assert depends_on(untrained)["checkpoint_rule"].startswith("untrained")


@pytest.mark.slow
def test_a_grid_scored_under_two_protocols_end_to_end(tmp_path, small_grid_dict):
    """Trains each model once, scores it under both protocols, and reports them side by side
    with what each number depends on: records, report tables, CSV columns, MLflow params."""
    import fsbench
    from fsbench.benchmarks.report import build_report

    grid = {**small_grid_dict, "name": "axis", "eval_protocols": ["panet", "hsnet"]}
    grid["methods"] = [{"name": "test_panet"}, {"name": "test_prototype_notrain"}]
    frame = fsbench.run(grid, results=tmp_path, serial=True)
    assert len(frame) == 2 * 2 * 2  # 2 methods × 2 protocols × 2 seeds
    records = [json.loads(p.read_text()) for p in (tmp_path / "axis" / "cells").glob("*.json")]
    trained = [r for r in records if r["config"]["method"] == "test_panet"]
    assert len(trained) == 2 and len({r["model_key"] for r in trained}) == 1
    assert len({r["checkpoint"] for r in trained}) == 1  # one model, saved once, scored twice
    scored = {r["config"].get("eval_protocol", "") for r in trained}
    assert scored == {"", "hsnet"}
    hsnet = next(r for r in trained if r["config"].get("eval_protocol") == "hsnet")
    assert hsnet["protocol"]["name"] == "hsnet" and hsnet["protocol"]["resize"] != "square"
    assert hsnet["depends_on"]["input_size"] == "32 px (square_floor_nearest resize)"
    written = build_report(tmp_path / "axis", n_boot=50)
    report = tmp_path / "axis" / "report"
    table = (report / "protocols.md").read_text()
    assert "mIoU (panet)" in table and "FB-IoU (hsnet)" in table and "Spread mIoU" in table
    assert (report / "protocols.png").is_file() and (report / "protocols.tex").is_file()
    assert report / "protocols.md" in written["tables"]
    import pandas as pd

    csv = pd.read_csv(report / "table_miou.csv", index_col=0)
    assert csv.loc["test_panet @hsnet", "depends_on.input_size"].startswith("32 px")
    assert "Depends on" in (report / "table_miou.md").read_text()
    assert "trained under" in (report / "table_miou.tex").read_text()
    rows = [r for r in written["rows"] if r["row"] == "test_panet @hsnet"]
    assert rows and rows[0]["depends_on"]["depends_on.trained_under"] == "panet protocol"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("axis")
    runs = client.search_runs([experiment.experiment_id], "tags.`fsbench.kind` = 'cell'")
    assert len(runs) == 4
    params = {r.data.tags["scored_under"]: r.data.params for r in runs}
    assert params["hsnet"]["depends_on.score_resolution"].startswith("input")
    assert params["hsnet"]["eval_protocol"] == "hsnet"


@pytest.fixture(scope="session")
def large_object_voc(tmp_path_factory):
    """A small generated VOC layout whose objects pass PFENet's 2·32·32-pixel support rule."""
    from fsbench.datasets.synthetic import write_voc

    root = tmp_path_factory.mktemp("voc256")
    write_voc(root, 300, 256, seed=0)
    return root


@pytest.mark.slow
def test_score_a_saved_checkpoint_under_three_protocols(tmp_path, capsys, large_object_voc):
    import pandas as pd
    import torch
    import yaml
    from helpers import cli

    from fsbench.methods import METHODS

    torch.manual_seed(0)
    weights = tmp_path / "panet.pt"
    torch.save(METHODS.build("panet", width=0.125).state_dict(), weights)
    code, out, err = cli(
        capsys, "score", "--method", "panet", "--kwarg", "width=0.125", "--checkpoint", weights,
        "--format", "fsbench", "--data-root", large_object_voc, "--fold", "0", "--shots", "1",
        "--episodes", "10", "--input-size", "97", "--results", tmp_path / "results", "--serial",
        "--no-tracking", "--quiet",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    grids = list((tmp_path / "results").glob("score_panet_pascal5i_*.grid.yaml"))
    assert len(grids) == 1  # the generated grid, re-runnable with `fsbench run`
    grid = yaml.safe_load(grids[0].read_text())
    assert grid["eval_protocols"] == ["panet", "pfenet", "hsnet"]
    assert grid["methods"][0]["checkpoint"] == str(weights)
    folder = tmp_path / "results" / grid["name"]
    records = [json.loads(p.read_text()) for p in (folder / "cells").glob("*.json")]
    assert sorted(r["protocol"]["name"] for r in records) == ["hsnet", "panet", "pfenet"]
    assert all(r["depends_on"]["checkpoint_rule"].startswith("released") for r in records)
    table = pd.read_csv(folder / "report" / "protocols.csv")
    assert sorted(table["protocol"]) == ["hsnet", "panet", "pfenet"]
    assert table["miou"].between(0, 100).all() and (table["miou_low"] <= table["miou"]).all()
    # the same checkpoint scored again: nothing recomputed
    code, out, err = cli(
        capsys, "score", "--method", "panet", "--kwarg", "width=0.125", "--checkpoint", weights,
        "--format", "fsbench", "--data-root", large_object_voc, "--fold", "0", "--shots", "1",
        "--episodes", "10", "--input-size", "97", "--results", tmp_path / "results", "--serial",
        "--no-tracking", "--quiet", "--no-report",
    )  # fmt: skip
    assert code == 0 and "0 cells written, 3 already done" in out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--checkpoint", "missing.pt"], "no such file"),
        (["--checkpoint", "{weights}", "--protocols", "panet", "nope"], "distinct protocols"),
        (["--checkpoint", "{weights}", "--kwarg", "width"], "KEY=VALUE"),
    ],
)
def test_score_bad_input_is_one_line(tmp_path, capsys, args, says):
    from helpers import cli, one_line_error

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not used")
    args = [str(a).replace("{weights}", str(weights)) for a in args]
    code, _, err = cli(capsys, "score", "--method", "panet", *args, "--results", tmp_path)
    assert code == 2 and one_line_error(err, says), err


@pytest.mark.slow  # runs a whole grid
def test_best_of_seeds_is_a_marked_column_and_published_best_runs_are_labelled(
    small_grid_dict, tmp_path
):
    """`seed_summary: best`: tables keep mean ± std over seeds and add, per shot, the fold mean
    of each fold's best test seed, marked ‡ with the note that it selects on the test set;
    reported.yaml's BAM rows (its Best_mIoU) land in that column, marked."""
    import pandas as pd

    from fsbench.benchmarks.cli.api import run
    from fsbench.benchmarks.report.tables import BEST_SEED_COLUMN, reported_rows

    grid = dict(small_grid_dict, seeds=[1, 2, 3], methods=["test_prototype_notrain"],
                seed_summary="best")  # fmt: skip
    frame = run(grid, results=tmp_path / "r", serial=True, tracking=False, report=True)
    report = tmp_path / "r" / "tiny" / "report"
    table = pd.read_csv(report / "table_miou.csv", index_col=0)
    best = frame.groupby("fold")["miou"].max().mean()
    assert table[f"1-shot {BEST_SEED_COLUMN} mean"].iloc[0] == pytest.approx(best, abs=1e-3)
    assert table[f"1-shot {BEST_SEED_COLUMN} mean"].iloc[0] > table["1-shot Mean mean"].iloc[0]
    text = (report / "table_miou.md").read_text()
    assert BEST_SEED_COLUMN in text and "selects on the test set" in text
    assert "$^\\ddagger$" in (report / "table_miou.tex").read_text()
    fake = pd.DataFrame({"dataset": ["pascal5i"], "protocol": ["bam"], "annotation": ["mask"],
                         "way": [1]})  # fmt: skip
    columns = [("1-shot", "Mean"), ("1-shot", BEST_SEED_COLUMN)]
    rows = reported_rows(fake, "miou", columns)
    (label,) = [r for r in rows.index if r.startswith("BAM")]
    assert "best test seed ‡" in label and rows.loc[label, ("1-shot", BEST_SEED_COLUMN)] == "67.8‡"
    with pytest.raises(FsbenchError, match="seed_summary: 'max' is not one of mean, best"):
        parse_grid(dict(grid, seed_summary="max"))
