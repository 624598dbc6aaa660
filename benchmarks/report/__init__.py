"""A grid's report, by concern: `frame` (cell records → the per-seed frame), `tables` (paper
tables), `statistics` (bootstrap intervals, paired comparisons), `figures`, and `build` (the
`report` command and the notebook API). Imports neither torch nor ray."""

from fsbench.benchmarks.grid.identity import CellConfig
from fsbench.benchmarks.report.build import (
    build_report,
    grid_folder,
    grid_plan,
    missing_cells,
    results_frame,
    results_table,
)
from fsbench.benchmarks.report.frame import (
    current_cells,
    display_name,
    load_cells,
    row_label,
    seed_frame,
)
from fsbench.benchmarks.report.statistics import statistics, statistics_markdown
from fsbench.benchmarks.report.tables import paper_table, to_csv_frame, to_latex, to_markdown
from fsbench.benchmarks.store.records import RESULT_VERSION, CellRecord, SeedRecord

__all__ = [
    "RESULT_VERSION",
    "CellConfig",
    "CellRecord",
    "SeedRecord",
    "build_report",
    "current_cells",
    "display_name",
    "grid_folder",
    "grid_plan",
    "load_cells",
    "missing_cells",
    "paper_table",
    "results_frame",
    "results_table",
    "row_label",
    "seed_frame",
    "statistics",
    "statistics_markdown",
    "to_csv_frame",
    "to_latex",
    "to_markdown",
]
