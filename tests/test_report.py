import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from fsbench.benchmarks.report import build_report, results_table

# (row, fold, shot) -> mIoU per seed (fractions); FB-IoU = (1 + mIoU) / 2 (background IoU 1)
RESULTS = {
    ("panet", 0, 1): [0.40, 0.42],
    ("panet", 1, 1): [0.30, 0.34],
    ("panet_nopar", 0, 1): [0.41, 0.45],
    ("panet_nopar", 1, 1): [0.20, 0.20],
}


def _counts(miou):
    """One episode whose counts give exactly this IoU for the fold's first class."""
    tp = int(round(miou * 100))
    return {
        "classes": [1],
        "per_class": [[[tp, 100 - tp, 0]]],
        "background": [[50, 0, 0]],
        "foreground": [[tp, 100 - tp, 0]],
    }


def _resummarise(record: dict) -> dict:
    """After a test edits a record's seed mIoUs: class IoU and summary as its counts give them
    (records are checked number by number against their counts)."""
    for seed in record["seeds"]:
        seed["class_iou"] = {"1": seed["miou"]}
    mean = float(np.mean([seed["miou"] for seed in record["seeds"]]))
    record["summary"] = {"miou_mean": mean, "class_iou_mean": {"1": mean}}
    return record


def write_cells(folder, results, dataset="synthetic_pascal5i"):
    cells = folder / "cells"
    cells.mkdir(parents=True)
    rows = sorted({r for r, _, _ in results}, key=["panet", "panet_nopar", "extra"].index)
    for (row, fold, shot), mious in results.items():
        seeds = []
        for seed, miou in zip((1, 2), mious):
            # one episode per seed whose counts give exactly this IoU for the fold's first class
            tp = int(round(miou * 100))
            seeds.append(
                {
                    "seed": seed,
                    "miou": miou,
                    "fb_iou": (1 + miou) / 2,
                    "episodes": 1,
                    "manifest_fingerprint": f"{fold}{shot}{seed}" * 8,
                    "class_iou": {"1": miou},
                    "counts": {
                        "classes": [1],
                        "per_class": [[[tp, 100 - tp, 0]]],
                        "background": [[50, 0, 0]],
                        "foreground": [[tp, 100 - tp, 0]],
                    },
                }
            )
        cell_id = f"{row}-{fold}-{shot}".replace("_", "")
        record = {
            "version": 1,
            "cell_id": cell_id,
            "grid": folder.name,
            "title": cell_id,
            "row_index": rows.index(row),
            "config": {
                "row": row,
                "method": row,
                "method_kwargs": {},
                "dataset": {"name": dataset},
                "fold": fold,
                "way": 1,
                "shot": shot,
                "annotation": "mask",
                "protocol": "panet",
            },
            "summary": {
                "miou_mean": float(np.mean(mious)),
                "class_iou_mean": {"1": float(np.mean(mious))},
            },
            "seeds": seeds,
            "train": None,
            "qualitative": [],
        }
        (cells / f"{cell_id}.json").write_text(json.dumps(record))


def test_known_table_text(tmp_path):
    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text().splitlines()
    assert table[0] == "| Method | 1-shot Fold-0 | 1-shot Fold-1 | 1-shot Mean |"
    # Mean column: per seed mean over folds (0.35, 0.38) → 36.5 ± 1.5
    assert table[2] == "| PANet | 41.0 ± 1.0 | **32.0 ± 2.0** | **36.5 ± 1.5** |"
    assert table[3] == "| PANet w/o PAR | **43.0 ± 2.0** | 20.0 ± 0.0 | 31.5 ± 1.0 |"


def test_latex_numbers_equal_results_files_and_bold_is_best(tmp_path):
    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=50)
    latex = (grid / "report" / "table_miou.tex").read_text()
    names = {"PANet": "panet", "PANet w/o PAR": "panet_nopar"}  # display names
    seen = set()
    for line in latex.splitlines():
        row = names.get(line.split(" & ")[0])
        if row is None:
            continue
        seen.add(row)
        cells = line.split(" & ")[1:]
        numbers = [tuple(map(float, re.findall(r"(-?\d+\.\d)", c))) for c in cells]
        for fold, (mean,) in enumerate(numbers[:2]):  # folds: the mean over seeds
            assert mean == round(100 * np.mean(RESULTS[(row, fold, 1)]), 1)
        mean, std = numbers[2]  # Mean: per seed mean over folds, then mean ± std
        per_seed = 100 * np.mean([RESULTS[(row, f, 1)] for f in range(2)], axis=0)
        assert (mean, std) == (round(per_seed.mean(), 1), round(per_seed.std(), 1))
        for fold in range(2):
            best = max(np.mean(RESULTS[(r, fold, 1)]) for r in ("panet", "panet_nopar"))
            is_best = np.mean(RESULTS[(row, fold, 1)]) == best
            assert ("\\textbf" in cells[fold]) == is_best
    assert seen == {"panet", "panet_nopar"}
    for part in ("\\toprule", "\\cmidrule(lr){2-4}", "\\bottomrule", "\\label{tab:hand-miou}"):
        assert part in latex
    csv = (grid / "report" / "table_miou.csv").read_text()
    assert "41.0" in csv and "1-shot Fold-0 std" in csv
    frame = results_table(grid)
    assert frame["mean"].loc["panet", ("1-shot", "Fold-1")] == pytest.approx(32.0)


def test_partial_grid_marks_missing_cells(tmp_path):
    grid = tmp_path / "partial"
    write_cells(grid, {k: v for k, v in RESULTS.items() if k != ("panet_nopar", 1, 1)})
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    assert "| PANet w/o PAR | **43.0 ± 2.0** | – | – |" in table


def test_reported_rows_beside_reproduced_labelled_never_bold(tmp_path):
    grid = tmp_path / "pascal"
    write_cells(grid, RESULTS, dataset="pascal5i")
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    reported = [line for line in table.splitlines() if "(reported)" in line]
    assert reported and all("**" not in line for line in reported)
    assert "Wang et al., ICCV 2019" in reported[0] and "42.3*" in reported[0]
    assert "published numbers, not reproduced here" in table
    # SG-One's numbers are OSLSM-protocol numbers: never shown beside panet-protocol rows
    assert "SG-One" not in table and not any("HSNet" in line for line in reported)
    synthetic = tmp_path / "synthetic"
    write_cells(synthetic, RESULTS)
    build_report(synthetic, n_boot=50)
    assert "(reported)" not in (synthetic / "report" / "table_miou.md").read_text()


def test_declared_comparisons_per_fold_and_fold_mean_with_holm(tmp_path):
    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=200)
    stats = (grid / "report" / "statistics.md").read_text()
    assert "No comparison declared" in stats  # pairs are the grid's, never hard-coded
    (grid / "plan.json").write_text(
        json.dumps({"cells": [], "compare": [["panet", "panet_nopar"]]})
    )
    build_report(grid, n_boot=200)
    stats = (grid / "report" / "statistics.md").read_text()
    # fold 1: 32.0 vs 20.0 → +12.0; fold 0: 41.0 vs 43.0 → -2.0; fold mean: +5.0 (rows named
    # as the tables name them)
    assert "| PANet | PANet w/o PAR | 1 | 1 | +12.0 |" in stats
    assert "| PANet | PANet w/o PAR | 1 | 0 | -2.0 |" in stats
    assert "| PANet | PANet w/o PAR | 1 | **mean** | +5.0 |" in stats
    # a 12-point gap: no replicate crosses zero, so p is only known to be below 1/B
    line = next(x for x in stats.splitlines() if "| 1 | 1 | +12.0 |" in x)
    assert "| < 1/200 |" in line, line
    table = pd.read_csv(grid / "report" / "statistics.csv")
    paired = table[table["kind"] == "paired"]
    assert len(paired) == 3
    # Holm: the smallest p times 3, then step-down, never below the raw p, never above 1
    assert (paired["p_holm"] >= paired["p"]).all() and (paired["p_holm"] <= 1).all()
    smallest = paired["p"].min()
    assert paired.loc[paired["p"].idxmin(), "p_holm"] == pytest.approx(min(1, 3 * smallest))


def test_training_seed_replicates_make_the_table_spread(tmp_path):
    # Two trained models of one row (train seeds 0 and 1): the table's ± spans them.
    grid = tmp_path / "seeds"
    write_cells(grid, RESULTS)
    cells = grid / "cells"
    for path in list(cells.glob("panet-*.json")):
        record = json.loads(path.read_text())
        for train_seed, shift in ((0, 0.0), (1, 0.1)):
            copy = json.loads(json.dumps(record))
            copy["cell_id"] = f"{record['cell_id']}s{train_seed}"
            copy["config"]["train"] = {"seed": train_seed}
            for seed in copy["seeds"]:
                miou = seed["miou"] + shift
                seed.update(miou=miou, fb_iou=(1 + miou) / 2, counts=_counts(miou))
            _resummarise(copy)
            (cells / f"{copy['cell_id']}.json").write_text(json.dumps(copy))
        path.unlink()
    build_report(grid, n_boot=20)
    table = (grid / "report" / "table_miou.md").read_text()
    # fold 0: models at 41.0 and 51.0 (means over episode seeds) → 46.0 ± 5.0
    assert "| PANet | **46.0 ± 5.0** |" in table
    assert "over training seeds 0, 1" in table


@pytest.mark.slow
def test_every_figure_kind_from_a_real_run(tmp_path, small_grid_dict):
    grid = dict(
        small_grid_dict,
        name="figs",
        shots=[1, 2],
        methods=[{"name": "test_panet", "sweep": {"alpha": [10, 20]}}, "test_panet_nopar"],
    )
    (tmp_path / "figs.yaml").write_text(yaml.safe_dump(grid))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli.main",
            "run",
            str(tmp_path / "figs.yaml"),
            "--serial",
            "--no-tracking",
            "--results",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = tmp_path / "results" / "figs" / "report"
    for kind in ("par_per_fold", "shots", "per_class_iou", "training_curves", "miou_vs_alpha"):
        assert (report / f"{kind}.png").stat().st_size > 1000
        assert (report / f"{kind}.pdf").stat().st_size > 1000
    assert (report / "qualitative.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid",
    [
        "panet_pascal.yaml",
        "panet_par_ablation.yaml",
        "panet_alpha_sweep.yaml",
        "panet_coco.yaml",
        "panet_weak_supports.yaml",
        "baselines.yaml",
        "quickstart_fss.yaml",
        "bam_pascal.yaml",
        "bam_coco.yaml",
        "hdmnet_pascal.yaml",
        "hdmnet_coco.yaml",
        "lineages_synthetic.yaml",
        "gf_sam_coco.yaml",
        "persam_coco.yaml",
        "matcher_lvis.yaml",
    ],
)
def test_paper_grids_run_at_smoke_size(grid, tmp_path, monkeypatch, capsys):
    # in this process (`fsbench run` as the CLI does; a subprocess per grid cost ~5 s of imports
    # each), from an empty working folder
    from fsbench.benchmarks.cli.main import main

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    args = ["run", grid, "--smoke", "--serial", "--no-tracking", "--no-report"]
    code = main([*args, "--results", str(tmp_path)])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert list((tmp_path / f"{grid[:-5]}_smoke" / "cells").glob("*.json"))
    # Generated data goes to the cache ($FSBENCH_DATA), never into the folder the command ran in.
    assert not list(workdir.iterdir())


def test_superseded_cells_are_left_out_not_mixed(tmp_path):
    grid = tmp_path / "edited"
    write_cells(grid, RESULTS)
    old = json.loads((grid / "cells" / "panet-0-1.json").read_text())
    newer = _resummarise(
        dict(
            old,
            cell_id="panetnew-0-1",
            finished_at="2026-12-01T00:00:00+00:00",
            seeds=[dict(s, miou=0.9, fb_iou=0.95, counts=_counts(0.9)) for s in old["seeds"]],
        )
    )
    (grid / "cells" / "panetnew-0-1.json").write_text(json.dumps(newer))
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    assert "| PANet | **90.0 ± 0.0** |" in table  # the newer cell only, not an average of both
    assert "superseded: panet-0-1" in table


def test_import_boundaries():
    """The report imports neither torch nor ray; only executors.py imports ray, tracking.py
    mlflow."""
    check = (
        "import sys, fsbench.benchmarks.report; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [
        *root.glob("benchmarks/*.py"),
        *root.glob("benchmarks/report/*.py"),
        *root.glob("methods/*.py"),
        *root.glob("datasets/*.py"),
    ]:
        text = path.read_text()
        if path.name != "executors.py":
            assert not re.search(r"^\s*(import ray|from ray)", text, re.M), path
        if path.name != "tracking.py":
            assert not re.search(r"^\s*(import mlflow|from mlflow)", text, re.M), path


WIDE = {(row, fold, shot): v for (row, fold, _), v in RESULTS.items() for shot in (1, 5)}
WIDE.update({(row, fold + 2, shot): v for (row, fold, shot), v in list(WIDE.items())})


def _latex_width(tex: str, folder, document_class: str) -> tuple[float, float]:
    """pdflatex the table in a document of that class: it must compile with no overfull box;
    returns (the tabular's natural width, the width available to it) in pt."""
    inner = tex[tex.index("\\begin{tabular}") : tex.index("\\end{tabular}") + len("\\end{tabular}")]
    document = "\n".join(
        [
            document_class,
            "\\usepackage{booktabs}",
            "\\usepackage{graphicx}",
            "\\begin{document}",
            "\\input{table.tex}",
            "\\small\\sbox0{" + inner + "}",
            "\\typeout{FSBENCH-WIDTH=\\the\\wd0}",
            "\\typeout{FSBENCH-AVAILABLE="
            + ("\\the\\textwidth}" if "table*" in tex else "\\the\\columnwidth}"),
            "\\end{document}",
        ]
    )
    (folder / "table.tex").write_text(tex)
    (folder / "doc.tex").write_text(document)
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (folder / "doc.log").read_text(errors="replace")
    assert done.returncode == 0, log[-2000:]
    assert "Overfull \\hbox" not in log, log[-2000:]
    width = float(re.search(r"FSBENCH-WIDTH=([\d.]+)pt", log).group(1))
    available = float(re.search(r"FSBENCH-AVAILABLE=([\d.]+)pt", log).group(1))
    return width, available


@pytest.mark.skipif(
    not shutil.which("pdflatex")
    or subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True).returncode != 0,
    reason="needs pdflatex with booktabs (Debian: texlive-latex-base, texlive-latex-recommended)",
)
@pytest.mark.slow  # runs pdflatex twice
@pytest.mark.parametrize(
    "document_class", ["\\documentclass{article}", "\\documentclass[twocolumn]{article}"]
)
def test_latex_table_compiles_and_fits(tmp_path, document_class):
    for name, results in (("narrow", RESULTS), ("wide", WIDE)):
        grid = tmp_path / name
        write_cells(grid, results, dataset="pascal5i")  # with the published rows
        build_report(grid, n_boot=20)
        tex = (grid / "report" / "table_miou.tex").read_text()
        assert ("table*" in tex) == (name == "wide")
        assert "(reported)" in tex and f"\\label{{tab:{name}-miou}}" in tex
        width, available = _latex_width(tex, grid / "report", document_class)
        scale = min(1.0, available / width)
        print(
            f"{name} table in {document_class}: natural {width:.0f} pt, set at "
            f"{width * scale:.0f} pt of {available:.0f} pt (scale {scale:.2f})"
        )
        if name == "narrow" and "twocolumn" not in document_class:
            assert width <= available  # never scaled where it fits


def test_figures_embed_no_type3_fonts(tmp_path):
    grid = tmp_path / "fonts"
    write_cells(grid, WIDE)
    written = build_report(grid, n_boot=20)
    pdfs = [p for p in written["figures"] if p.suffix == ".pdf"]
    assert pdfs
    for pdf in pdfs:
        data = pdf.read_bytes()
        assert b"/Type3" not in data, pdf
        assert b"/TrueType" in data or b"/CIDFontType2" in data, pdf
    csv = (grid / "report" / "table_class_iou.csv").read_text().splitlines()
    assert csv[0].startswith("method,shot,fold") or csv[0].startswith("class,")


def test_a_registered_metric_reaches_records_frame_tables_and_direction(tmp_path):
    """A metric is one registration: cells written before it existed get it from their counts,
    the report writes its tables, and a lower-is-better metric bolds the lowest mean."""
    from fsbench.benchmarks.metrics import METRICS, EpisodeCounts, register_metric
    from fsbench.benchmarks.report.frame import load_cells, seed_frame

    @register_metric("fg_error", "FG error", higher_is_better=False)
    def fg_error(per_class, background, foreground):
        """Share of foreground-labelled or -predicted pixels that are wrong: (fp + fn) / all."""
        return (foreground[..., 1] + foreground[..., 2]) / foreground.sum(-1)

    try:
        grid = tmp_path / "hand"
        write_cells(grid, RESULTS)  # records without the new metric
        frame = seed_frame(load_cells(grid))
        expected = [
            100 * EpisodeCounts.from_json(s["counts"]).value("fg_error")
            for c in sorted((grid / "cells").glob("*.json"))
            for s in json.loads(c.read_text())["seeds"]
        ]
        assert sorted(frame["fg_error"]) == pytest.approx(sorted(expected))
        assert frame["fg_error"].min() == pytest.approx(100 * (1 - 0.45))  # tp 45 of 100
        build_report(grid, n_boot=50)
        table = (grid / "report" / "table_fg_error.md").read_text().splitlines()
        # panet_nopar fold 0 (seeds 0.41, 0.45 → errors 59, 55) has the lowest error: bold
        assert table[3].startswith("| PANet w/o PAR | **57.0 ± 2.0** |"), table
        assert "FG error %" in (grid / "report" / "table_fg_error.md").read_text()
        assert (grid / "report" / "table_miou.md").exists()
    finally:
        METRICS.pop("fg_error", None)


def test_cell_records_are_typed_and_round_trip(tmp_path):
    """records.py is the one reader and writer of cell files: typed fields, numbers checked
    against the counts, unknown keys (a later version's) kept on the way back out."""
    from fsbench.benchmarks.store.records import CellRecord, RecordError, read_cells

    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    path = sorted((grid / "cells").glob("*.json"))[0]
    raw = json.loads(path.read_text())
    raw["from_the_future"] = {"kept": True}
    raw["config"]["later_setting"] = 3
    record = CellRecord.from_json(raw, path.stem, "hand")
    assert record.seeds[0].metric("miou") == raw["seeds"][0]["miou"]
    assert record.mean("miou") == raw["summary"]["miou_mean"]
    assert (record.config.fold, record.config.dataset_name) == (0, "synthetic_pascal5i")
    assert record.to_json()["from_the_future"] == {"kept": True}
    assert record.config.to_json()["later_setting"] == 3
    assert CellRecord.from_json(record.to_json()).to_json() == record.to_json()
    raw["seeds"][0]["miou"] += 0.01
    with pytest.raises(RecordError, match="is not what its per-episode counts give"):
        CellRecord.from_json(raw)
    del raw["config"]["shot"]
    with pytest.raises(RecordError, match="incomplete record"):
        CellRecord.from_json(raw)
    rejected = {}
    path.write_text(json.dumps(raw))
    assert len(read_cells(grid / "cells", "hand", rejected)) == len(RESULTS) - 1
    assert list(rejected) == [path.name]


def test_statistics_give_each_cell_its_ci_half_width_and_episode_budget(tmp_path):
    from fsbench.benchmarks.report.statistics import episode_budget

    grid = tmp_path / "budget"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=200)
    stats = (grid / "report" / "statistics.md").read_text()
    table = pd.read_csv(grid / "report" / "statistics.csv")
    cis = table[table["kind"] == "ci"]
    assert "# Episode budget" in stats and (cis["episodes"] > 0).all()
    budget = [x for x in stats.split("# Episode budget")[1].splitlines() if x.startswith("| PANet")]
    assert len(budget) == len(cis.groupby(["name", "shot", "fold"]))
    # by hand: two seeds of 1000 episodes with ±1.0 and ±1.5 → ±1.25 → 1000·(1.25/0.5)² = 6250
    frame = pd.DataFrame(
        [
            {"kind": "ci", "name": "PANet", "shot": 1, "fold": 0, "episodes": 1000,
             "value": 41.0, "low": 40.0, "high": 42.0},
            {"kind": "ci", "name": "PANet", "shot": 1, "fold": 0, "episodes": 1000,
             "value": 43.0, "low": 41.5, "high": 44.5},
        ]
    )  # fmt: skip
    (line,) = [x for x in episode_budget(frame) if x.startswith("| PANet")]
    assert line == "| PANet | 1 | 0 | 1000 | 42.0 | 1.25 | 6250 |"
