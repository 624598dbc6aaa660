"""What each `fsbench` subcommand does (cli.py parses the command line and calls these): run,
config, manifest, list, report, qualitative (ui and sync: mlflow_commands.py). Each returns the
exit status; a user's mistake is an `FsbenchError`, which cli.py prints as one line."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import time
from pathlib import Path

import yaml

from fsbench.core import FsbenchError


def _results_root(args) -> Path:
    from fsbench.benchmarks.store.results import default_results_root

    root = (
        Path(args.results).expanduser().resolve()
        if getattr(args, "results", None)
        else default_results_root()
    )
    if root.exists() and not root.is_dir():
        raise FsbenchError(f"{root}: is a file; --results must name a folder (made if missing)")
    return root


def cmd_run(args) -> int:
    from fsbench.benchmarks.grid.files import load_grid
    from fsbench.benchmarks.store.results import ResultStore

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"dataset.data_root={Path(args.data_root).expanduser().resolve()}")
    grid = load_grid(args.grid, overrides, smoke=args.smoke, imports=args.imports or ())
    root = _results_root(args)
    store = ResultStore(root, grid.name)
    if args.dry_run:
        return _dry_run(grid, store, args)
    from fsbench.benchmarks.cli.api import RunOptions, execute
    from fsbench.benchmarks.tracking.tracker import redacted, runs_url

    started = time.perf_counter()
    # One run per results folder and grid (its lock): a second one would compute every cell again.
    driver, tracker, store = execute(
        grid,
        root,
        RunOptions(
            serial=args.serial,
            ray_address=args.ray_address,
            num_cpus=args.num_cpus,
            threads=args.threads,
            max_retries=args.max_retries,
            eval_gpu_fraction=args.eval_gpu_fraction,
            eval_group=args.eval_group,
            tracking=not args.no_tracking,
            tracking_uri=args.tracking_uri,
            rerun=args.rerun,
            progress=not args.quiet,
        ),
    )
    wall = time.perf_counter() - started
    total = len(grid.expand())
    print(
        f"\n{grid.name}: {len(driver.written)} cells written, "
        f"{total - len(driver.written) - len(driver.failed)} "
        f"already done, {len(driver.failed)} failed, in {wall:.0f}s → {store.grid_dir}"
    )
    if not args.no_report:
        from fsbench.benchmarks.report import build_report

        try:
            written = build_report(store.grid_dir)
        except Exception as error:  # noqa: BLE001 - the results are safe; say so in one line
            print(
                f"fsbench: report failed ({type(error).__name__}: {error}); results are saved "
                f"in {store.grid_dir}; retry with: python run_benchmark.py report {grid.name}",
                file=sys.stderr,
            )
            written = {"tables": [], "figures": []}
        print(
            "Tables:  "
            + ", ".join(str(p) for p in written["tables"] if p.suffix in (".md", ".tex"))
        )
        print(f"Figures: {', '.join(str(p) for p in written['figures'] if p.suffix == '.png')}")
        table = store.grid_dir / "report" / "table_miou.md"
        if table.exists():
            print("\n" + table.read_text())
        if tracker is not None:
            tracker.log_report(store.grid_dir / "report", written.get("rows"))
    if tracker is not None:
        if tracker.available:
            print(
                f"MLflow: {redacted(tracker.uri)}  — browse it with:  python run_benchmark.py ui "
                + grid.name
                + (f" --results {root}" if args.results else "")
                + "  (then open "
                + runs_url("http://127.0.0.1:5000", tracker.experiment_id, tracker.shared_view())
                + ")"
            )
        else:
            print(
                f"MLflow was unreachable: {tracker.pending} cells wait; push them with:  "
                f"python run_benchmark.py sync {grid.name}"
            )
    return 1 if driver.failed else 0


def _dry_run(grid, store, args) -> int:
    from fsbench.benchmarks.execution.runner import plan_grid
    from fsbench.benchmarks.execution.tasks import available_cores

    plan = plan_grid(grid, store, args.rerun, build_manifests=False)
    done = {c.id for c in plan.cells} - {c.id for c in plan.todo}
    has_gpu = False
    if not args.serial:
        has_gpu = bool(args.ray_address or os.environ.get("RAY_ADDRESS")) and grid.device != "cpu"
    threads = args.threads or (available_cores() if args.serial else 1)
    per_task = (
        f"train: 1 GPU + 1 CPU, eval: {args.eval_gpu_fraction} GPU"
        if has_gpu
        else f"train: {threads} CPU, eval: {threads} CPU"
    )
    print(
        f"grid {grid.name}: {len(plan.cells)} cells, {len(done)} done, {len(plan.todo)} to run, "
        f"{len(plan.jobs)} models ({sum(j.trainable for j in plan.jobs)} to train)"
    )
    print(
        f"resources per task ({'a GPU cluster' if has_gpu else 'CPU'}): {per_task}"
        + (
            ""
            if has_gpu
            else f"; with GPUs in the cluster: train 1 GPU, eval {args.eval_gpu_fraction} GPU"
        )
    )
    for cell in plan.cells:
        state = "done" if cell.id in done else "todo"
        kind = _kind(cell)
        print(f"  [{state}] {cell.id}  {cell.title:<40} {kind:<10} seeds {list(cell.seeds)}")
    return 0


def _kind(cell) -> str:
    """What a cell costs: train+eval (with its stages and their steps), or eval only (no
    training, or another cell's model)."""
    if cell.train is None:
        return "eval"
    if cell.trained_as is not None:
        return "eval (model shared)"
    if cell.train.stages:
        stages = " → ".join(f"{n} {c.steps}" for n, _, c in cell.train.stage_configs())
        return f"train+eval [{stages} steps]"
    return "train+eval"


def cmd_config(args) -> int:
    """The grid as fsbench resolved it (YAML), then its cells."""
    from fsbench.benchmarks.grid.files import load_grid

    grid = load_grid(args.grid, args.overrides, smoke=args.smoke, imports=args.imports or ())
    resolved = json.loads(json.dumps(dataclasses.asdict(grid), default=list))
    for entry, spec in zip(resolved["methods"], grid.methods):  # overrides as a mapping
        entry["train"] = {k: _plain(v) for k, v in spec.train}
        if not entry["train"]:
            del entry["train"]
    print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
    cells = grid.expand()
    print(f"# {len(cells)} cells")
    for cell in cells:
        kind = _kind(cell)
        print(f"#   {cell.id}  {cell.title:<40} {kind}")
    return 0


def _plain(value):
    """A training override as written: sorted pairs back to a mapping, tuples to lists."""
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, tuple) and len(v) == 2 for v in value)
        and all(isinstance(v[0], str) for v in value)
    ):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def cmd_manifest(args) -> int:
    from fsbench.datasets.episodes import EpisodeManifest
    from fsbench.datasets.protocols import resolve
    from fsbench.datasets.registry import DATASETS

    protocol = resolve(args.protocol, args.dataset)
    if args.dataset in ("pascal5i", "coco20i") and not args.data_root:
        raise FsbenchError(f"--data-root is required for {args.dataset} (the dataset folder)")
    kwargs = {"data_root": args.data_root} if args.data_root else {}
    dataset = DATASETS.build(args.dataset, protocol=protocol, **kwargs)
    dataset.check_fold(args.fold)
    manifest = EpisodeManifest.build(
        dataset,
        protocol,
        args.fold,
        args.way,
        args.shot,
        args.episodes or protocol.episodes,
        protocol.seeds[0] if args.seed is None else args.seed,
        sampler=args.sampler,
    )
    if args.output and Path(args.output).is_dir():
        raise FsbenchError(
            f"--output {args.output}: is a folder; name the manifest file, e.g. "
            f"{Path(args.output) / 'manifest.json'}"
        )
    path = manifest.save(args.output)
    lists = f"; lists: {manifest.spec['lists']}" if "lists" in manifest.spec else ""
    print(
        f"{path}: {len(manifest.episodes)} episodes, sampler {manifest.sampler}{lists}, "
        f"fingerprint {manifest.fingerprint}"
    )
    return 0


def _needs_folder(builder) -> bool:
    """A real dataset's builder takes `data_root` without a default (a generated one makes its
    data when given none)."""
    parameter = inspect.signature(builder).parameters.get("data_root")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def cmd_list(args) -> int:
    from fsbench.datasets.protocols import PROTOCOLS, resolve
    from fsbench.datasets.registry import DATASETS, dataset_class
    from fsbench.methods import METHODS

    if args.dataset:
        protocol = resolve(args.protocol, args.dataset)
        # Fold definitions the benchmark fixes need no data to list (real datasets, no folder).
        published = None
        if not args.data_root and _needs_folder(DATASETS.get(args.dataset)):
            published = dataset_class(args.dataset).published_folds(protocol, args.split_style)
        if published:
            names, folds, heading = published
            if heading:
                print(heading)
        else:
            kwargs = {"data_root": args.data_root} if args.data_root else {}
            if args.split_style:
                kwargs["split_style"] = args.split_style
            try:
                dataset = DATASETS.build(args.dataset, protocol=protocol, **kwargs)
            except TypeError as error:
                raise FsbenchError(
                    f"dataset {args.dataset}: {error}; give its folder with --data-root"
                ) from None
            names = dataset.class_names
            folds = [dataset.fold_classes(f) for f in range(dataset.num_folds)]
        for fold, classes in enumerate(folds):
            print(f"fold {fold}: " + ", ".join(f"{c} {names[c - 1]}" for c in classes))
        return 0
    print("methods:")
    for name in METHODS.list():
        print(f"  {name:<20} {_trains(METHODS, name):<9} {_summary(METHODS.get(name))}")
    print("datasets:")
    for name in DATASETS.list():
        print(f"  {name:<20} {_summary(DATASETS.get(name))}")
    print("protocols: " + ", ".join(PROTOCOLS))
    from fsbench.benchmarks.grid.files import bundled_grids

    print("grids:     " + ", ".join(bundled_grids()))
    return 0


def _summary(builder) -> str:
    """The first line of a registered builder's docstring."""
    return ((builder.__doc__ or "").strip().splitlines() or [""])[0]


def _trains(registry, name: str) -> str:
    """'trains' or 'no train', as the method's class declares it; a builder that declares no
    class is built without keywords to ask it ('?' when that fails)."""
    import torch

    declared = registry.provides(name)
    if declared is None:
        with torch.random.fork_rng():
            try:
                declared = registry.build(name)
            except Exception:  # noqa: BLE001 - e.g. a method that needs keywords
                return "?"
    return "trains" if declared.trainable else "no train"


def cmd_report(args) -> int:
    from fsbench.benchmarks.report import build_report

    folder = _grid_folder(args)
    written = build_report(folder)
    for kind, paths in written.items():
        if kind != "rows":
            print(f"{kind}: " + ", ".join(str(p) for p in paths))
    _refresh_tracked_report(args, folder, written)
    return 1 if written.get("rejected") else 0


def _refresh_tracked_report(args, folder: Path, written: dict) -> None:
    """`report` refreshes the grid run's report artifacts and row runs where the grid's
    tracking store is reachable (the default store when it exists, or --tracking-uri)."""
    from fsbench.benchmarks.store.results import GridLock, ResultStore
    from fsbench.benchmarks.tracking.tracker import Tracker, default_tracking_uri

    root = folder.parent
    uri = getattr(args, "tracking_uri", None) or default_tracking_uri(root)
    if uri.startswith("sqlite:") and not (root / "mlflow.db").is_file():
        return  # never tracked: do not create a store
    lock = GridLock(ResultStore(root, folder.name), f"fsbench report {folder.name}")
    try:
        lock.__enter__()
    except FsbenchError as busy:  # a run holds the grid: it logs its own report at its end
        print(f"fsbench: MLflow report not refreshed: {busy}", file=sys.stderr)
        return
    try:
        tracker = Tracker(uri, root, folder.name)
        if tracker.client is not None and tracker.client.get_experiment_by_name(folder.name):
            tracker.log_report(folder / "report", written.get("rows"))
            if tracker.available:
                print(f"MLflow: refreshed the report and row runs of {folder.name!r}")
    finally:
        lock.__exit__(None, None, None)


def _grid_folder(args) -> Path:
    folder = Path(args.grid)
    if not folder.is_dir():
        folder = _results_root(args) / args.grid
    if not folder.is_dir():
        raise FsbenchError(f"{folder}: no results for grid {args.grid!r} (run it first)")
    return folder


def cmd_qualitative(args) -> int:
    from fsbench.benchmarks.cli.qualitative import render
    from fsbench.core import import_plugins

    import_plugins(tuple(args.imports or ()), (str(Path.cwd()),))
    print(render(_grid_folder(args), args.cell, args.episodes))
    return 0


def cmd_prepare(args) -> int:
    """`fsbench prepare deepglobe|isic2018 RAW OUT`: a cross-domain test set in PATNet's layout."""
    from fsbench.datasets.cross_domain_prepare import prepare_deepglobe, prepare_isic

    raw, out = Path(args.raw).expanduser(), Path(args.out).expanduser()
    if not raw.is_dir():
        raise FsbenchError(f"{raw}: not a folder; pass the folder of the official download")
    if args.dataset == "deepglobe":
        counts = prepare_deepglobe(raw, out)
    else:
        counts = prepare_isic(raw, out, args.classes)
    per_class = ", ".join(f"class {c}: {n}" for c, n in counts.items())
    print(f"{args.dataset}: {sum(counts.values())} images written under {out} ({per_class})")
    print(f"use it with:  dataset: {{name: {args.dataset}, data_root: {out}}}")
    return 0
