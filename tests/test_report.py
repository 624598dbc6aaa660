import json
import re
import subprocess
import sys

import numpy as np
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
    assert table[2] == "| panet | 41.0 ± 1.0 | **32.0 ± 2.0** | **36.5 ± 1.5** |"
    assert table[3] == "| panet_nopar | **43.0 ± 2.0** | 20.0 ± 0.0 | 31.5 ± 1.0 |"


def test_latex_numbers_equal_results_files_and_bold_is_best(tmp_path):
    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=50)
    latex = (grid / "report" / "table_miou.tex").read_text()
    for line in latex.splitlines():
        row = line.split(" & ")[0].replace("\\_", "_")
        if row not in ("panet", "panet_nopar"):
            continue
        cells = line.split(" & ")[1:]
        pairs = [tuple(map(float, re.findall(r"(-?\d+\.\d)", c))) for c in cells]
        for fold, (mean, std) in enumerate(pairs[:2]):
            values = 100 * np.array(RESULTS[(row, fold, 1)])
            assert mean == round(values.mean(), 1) and std == round(values.std(), 1)
        for fold in range(2):
            best = max(np.mean(RESULTS[(r, fold, 1)]) for r in ("panet", "panet_nopar"))
            is_best = np.mean(RESULTS[(row, fold, 1)]) == best
            assert ("\\textbf" in cells[fold]) == is_best
    assert "\\toprule" in latex and "\\bottomrule" in latex
    csv = (grid / "report" / "table_miou.csv").read_text()
    assert "41.0" in csv and "1-shot Fold-0 std" in csv
    frame = results_table(grid)
    assert frame["mean"].loc["panet", ("1-shot", "Fold-1")] == pytest.approx(32.0)


def test_partial_grid_marks_missing_cells(tmp_path):
    grid = tmp_path / "partial"
    write_cells(grid, {k: v for k, v in RESULTS.items() if k != ("panet_nopar", 1, 1)})
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    assert "| panet_nopar | **43.0 ± 2.0** | – | – |" in table


def test_reported_rows_beside_reproduced_labelled_never_bold(tmp_path):
    grid = tmp_path / "pascal"
    write_cells(grid, RESULTS, dataset="pascal5i")
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    reported = [line for line in table.splitlines() if "(reported)" in line]
    assert reported and all("**" not in line for line in reported)
    assert "Wang et al., ICCV 2019" in reported[0] and "42.3†" in reported[0]
    assert "published numbers, not reproduced here" in table
    synthetic = tmp_path / "synthetic"
    write_cells(synthetic, RESULTS)
    build_report(synthetic, n_boot=50)
    assert "(reported)" not in (synthetic / "report" / "table_miou.md").read_text()


def test_paired_statistics_mark_noise(tmp_path):
    grid = tmp_path / "hand"
    write_cells(grid, RESULTS)
    build_report(grid, n_boot=50)
    stats = (grid / "report" / "statistics.md").read_text()
    assert "| panet | panet_nopar | 1 | 1 | 1 | +10.0 |" in stats


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
            "fsbench.benchmarks.cli",
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


@pytest.mark.parametrize(
    "grid",
    [
        "panet_pascal.yaml",
        "panet_par_ablation.yaml",
        "panet_alpha_sweep.yaml",
        "panet_coco.yaml",
        "panet_weak_supports.yaml",
        "baselines.yaml",
    ],
)
def test_paper_grids_run_at_smoke_size(grid, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsbench.benchmarks.cli",
            "run",
            grid,
            "--smoke",
            "--serial",
            "--no-tracking",
            "--no-report",
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=workdir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / f"{grid[:-5]}_smoke" / "cells").glob("*.json"))
    # Generated data goes to the cache ($FSBENCH_DATA), never into the folder the command ran in.
    assert not list(workdir.iterdir())


def test_superseded_cells_are_left_out_not_mixed(tmp_path):
    grid = tmp_path / "edited"
    write_cells(grid, RESULTS)
    old = json.loads((grid / "cells" / "panet-0-1.json").read_text())
    newer = dict(
        old,
        cell_id="panetnew-0-1",
        finished_at="2026-12-01T00:00:00+00:00",
        seeds=[dict(s, miou=0.9, fb_iou=0.95, counts=_counts(0.9)) for s in old["seeds"]],
        summary=dict(old["summary"], miou_mean=0.9),
    )
    (grid / "cells" / "panetnew-0-1.json").write_text(json.dumps(newer))
    build_report(grid, n_boot=50)
    table = (grid / "report" / "table_miou.md").read_text()
    assert "| panet | **90.0 ± 0.0** |" in table  # the newer cell only, not an average of both
    assert "superseded: panet-0-1" in table


def test_import_boundaries():
    """report.py imports neither torch nor ray; only runner.py imports ray, tracking.py mlflow."""
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
        *root.glob("methods/*.py"),
        *root.glob("datasets/*.py"),
    ]:
        text = path.read_text()
        if path.name != "runner.py":
            assert not re.search(r"^\s*(import ray|from ray)", text, re.M), path
        if path.name != "tracking.py":
            assert not re.search(r"^\s*(import mlflow|from mlflow)", text, re.M), path
