"""Grid and cell identity: a grid file (YAML with includes and `key=value` overrides) becomes a
`GridSpec`, which expands into `Cell`s with stable content-hash ids. Owns the grid's values and
their checks — method entries (`entries`), training recipes (`recipes`), cells (`cells`), files
(`files`) — and nothing that runs: parsing a grid imports no trainer, worker or evaluator."""

__all__ = ["Cell", "GridSpec", "apply_overrides", "bundled_grids", "load_grid", "parse_grid"]


def __getattr__(name: str):
    # `from fsbench.benchmarks.grid import load_grid` on first use: the report imports
    # grid.identity without the methods registry (and torch) that cells and files need.
    if name in ("Cell", "GridSpec"):
        from fsbench.benchmarks.grid import cells

        return getattr(cells, name)
    if name in __all__:
        from fsbench.benchmarks.grid import files

        return getattr(files, name)
    raise AttributeError(f"module 'fsbench.benchmarks.grid' has no attribute {name!r}")
