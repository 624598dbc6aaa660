"""The Python API (`import fsbench`): run a grid from a script or notebook, register methods
and datasets. The CLI's `run` is this `execute` plus printing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsbench.core import FsbenchError
from fsbench.datasets.registry import DATASETS


@dataclass
class RunOptions:
    """How a grid runs (what it computes is the grid's)."""

    serial: bool = False  # in-process; else Ray (a local instance, or `ray_address`)
    ray_address: str | None = None
    num_cpus: int | None = None
    threads: int | None = None
    max_retries: int = 3
    eval_gpu_fraction: float = 0.5
    eval_group: str = "model"
    tracking: bool = True
    tracking_uri: str | None = None
    rerun: bool = False
    progress: bool = True


def execute(grid, results_root: Path, options: RunOptions):
    """Plan, run and record `grid` (a GridSpec) under `results_root`, holding the grid's lock;
    returns (driver, tracker, store)."""
    from fsbench.benchmarks.execution.executors import RayExecutor, SerialExecutor
    from fsbench.benchmarks.execution.graph import Executor
    from fsbench.benchmarks.execution.runner import run_grid
    from fsbench.benchmarks.store.results import GridLock, ResultStore

    store = ResultStore(results_root, grid.name)
    with GridLock(store, f"fsbench run {grid.name}"):
        executor: Executor
        if options.serial:
            executor = SerialExecutor(
                grid.device, options.threads, grid.cache_bytes, grid.eval_batch_size
            ).start()
        else:
            executor = RayExecutor(
                options.ray_address,
                options.num_cpus,
                grid.device,
                options.threads,
                options.max_retries,
                grid.eval_gpus or options.eval_gpu_fraction,  # the grid's value first
                options.eval_group,
                grid.cache_bytes,
                grid.eval_batch_size,
                train_gpus=grid.train_gpus,
            ).start()
        tracker = None
        try:
            if options.tracking:
                from fsbench.benchmarks.tracking.tracker import Tracker, default_tracking_uri

                uri = options.tracking_uri or default_tracking_uri(store.root)
                tracker = Tracker(uri, store.root, grid.name, asynchronous=True)
            driver = run_grid(grid, store, executor, tracker, options.rerun, options.progress)
        finally:
            executor.stop()
    return driver, tracker, store


def run(
    grid,
    overrides=(),
    *,
    results=None,
    smoke: bool = False,
    imports=(),
    report: bool = False,
    **options,
):
    """Run a grid (a bundled name, a YAML path, or a dict) and return its results: one row per
    (cell, episode seed) — row, method, dataset, fold, way, shot, seed, miou, fb_iou, … (%).

    `options` are `RunOptions` fields (serial=True, ray_address=…, tracking=False, …); finished
    cells are not recomputed (rerun=True forces). Example (run by tests/test_cli.py)::

        import fsbench
        from fsbench.methods.base import FewShotMethod

        @fsbench.register_method()
        def my_method(**kwargs) -> FewShotMethod:
            return MyMethod(**kwargs)  # your FewShotMethod subclass

        frame = fsbench.run(
            "quickstart.yaml",
            ["shots=[1]", "methods=[my_method]", "compare=[]"],  # compare named removed rows
            serial=True,
            tracking=False,
        )
        print(frame.groupby("fold")["miou"].mean())
    """
    from fsbench.benchmarks.grid.files import apply_overrides, load_grid, parse_grid
    from fsbench.benchmarks.report import build_report, load_cells, seed_frame
    from fsbench.benchmarks.store.results import default_results_root

    unknown = set(options) - set(RunOptions.__dataclass_fields__)
    if unknown:
        raise FsbenchError(
            f"fsbench.run: unknown option(s) {sorted(unknown)}; known: "
            f"{sorted(RunOptions.__dataclass_fields__)}"
        )
    if isinstance(grid, dict):
        raw = apply_overrides(grid, list(overrides))
        if imports:
            raw["imports"] = [*(raw.get("imports") or []), *imports]
        spec = parse_grid(raw, (str(Path.cwd()),))
    else:
        spec = load_grid(grid, overrides, smoke=smoke, imports=imports)
    root = Path(results).expanduser().resolve() if results else default_results_root()
    driver, _, store = execute(spec, root, RunOptions(**options))
    if report:
        build_report(store.grid_dir)
    ids = {cell.id for cell in spec.expand()}
    return seed_frame([c for c in load_cells(store.grid_dir) if c.cell_id in ids])


def register_method(name: str | None = None, *, display: str | None = None, aliases=()):
    """Decorator: register a builder of a `FewShotMethod` under `name` (default: its name),
    with the name tables, figures and MLflow print (`display`, e.g. "BAM") and its former
    names (`aliases`: grids and finished results that name them still find it)."""
    from fsbench.methods import METHODS

    return METHODS.register(name, display=display, aliases=aliases)


def register_evaluator(name: str | None = None):
    """Decorator: register an `Evaluator` subclass (or a builder taking `output_kind`) that a grid
    names in `evaluators: [...]`; it is fed every batch of query outputs and labels on every
    evaluation path, and its `result()` (JSON) is kept in each seed's record."""
    from fsbench.benchmarks.metrics import EVALUATORS

    return EVALUATORS.register(name)


def register_dataset(name: str | None = None):
    """Decorator: register a builder of a `FewShotDataset` under `name` (default: its name);
    annotate its return type with the class so the engine knows it without opening data."""
    return DATASETS.register(name)
