"""Grid and cell identity: a grid file (YAML with includes and `key=value` overrides) becomes a
`GridSpec`, which expands into `Cell`s with stable content-hash ids. Owns the grid's values and
their checks — method entries (`entries`), training recipes (`recipes`), cells (`cells`), files
(`files`) — and nothing that runs: parsing a grid imports no trainer, worker or evaluator."""

from fsbench.benchmarks.grid.cells import Cell, GridSpec
from fsbench.benchmarks.grid.files import apply_overrides, bundled_grids, load_grid, parse_grid

__all__ = ["Cell", "GridSpec", "apply_overrides", "bundled_grids", "load_grid", "parse_grid"]
