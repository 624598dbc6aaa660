"""`fsbench` / `python run_benchmark.py`: the command line (options, help, errors in one line);
the subcommands themselves are in commands.py."""

from __future__ import annotations

import argparse
import signal
import sys

from fsbench.benchmarks.cli.commands import (
    _results_root,
    cmd_config,
    cmd_list,
    cmd_manifest,
    cmd_prepare,
    cmd_qualitative,
    cmd_report,
    cmd_run,
)
from fsbench.benchmarks.cli.mlflow_commands import cmd_sync, cmd_ui
from fsbench.benchmarks.cli.score import add_score_parser, cmd_score
from fsbench.core import FsbenchError, catch_sigterm, one_line, terminated

DEFAULT_GRID = "quickstart.yaml"
RESULTS_HELP = "results root (default ./results or $FSBENCH_RESULTS)"
TRACKING_HELP = "MLflow tracking URI (default sqlite:///<results>/mlflow.db)"
IMPORT_HELP = "module registering your methods/datasets (repeatable; joins the grid's imports:)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fsbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def _at_least(low: int):
    """argparse type: an integer ≥ low (argparse then names the option in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is impossible (must be ≥ {low})")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with fsbench's error format: one line naming the problem, exit 2."""

    def error(self, message):
        self.exit(2, f"fsbench: error: {self.prog}: {message} (see {self.prog} --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsbench",
        description="Few-shot segmentation benchmark harness. With no command, "
        "runs the embedded quickstart benchmark (synthetic PASCAL-format data, CPU, minutes).",
    )
    parser.add_argument("--version", action="version", version=f"fsbench {_version()}")
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="run a grid file (bundled name or path)")
    run.add_argument("grid", help="grid YAML (e.g. quickstart.yaml or a path)")
    run.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. shots=[1] train.steps=100"
    )
    _add_run_options(run)
    add_score_parser(commands, _add_run_options, _at_least)

    config = commands.add_parser(
        "config",
        help="print a grid as resolved (includes, smoke, overrides, defaults) and its cells",
    )
    config.add_argument("grid", help="grid YAML (e.g. quickstart.yaml or a path)")
    config.add_argument("overrides", nargs="*", help="key=value overrides, as for run")
    config.add_argument("--smoke", action="store_true", help="apply the grid's `smoke:` section")
    config.add_argument("--import", dest="imports", action="append", help=IMPORT_HELP)

    manifest = commands.add_parser("manifest", help="write a fixed episode manifest as JSON")
    manifest.add_argument("--dataset", default="pascal5i", help="dataset name (see `list`)")
    manifest.add_argument("--data-root", help="dataset folder (containing VOCdevkit/)")
    manifest.add_argument("--fold", type=_at_least(0), required=True, help="test fold, 0…3")
    manifest.add_argument("--way", type=_at_least(1), default=1, help="classes per episode")
    manifest.add_argument("--shot", type=_at_least(1), default=1, help="supports per class")
    manifest.add_argument("--episodes", type=_at_least(1), help="default: the protocol's")
    manifest.add_argument("--seed", type=int, help="default: the protocol's first seed")
    manifest.add_argument("--protocol", default="panet", help="evaluation protocol (see `list`)")
    manifest.add_argument(
        "--sampler",
        choices=("official", "fsbench"),
        help="official: the episodes the protocol's own test script draws (the default); "
        "fsbench: fsbench's sampler (distinct supports)",
    )
    manifest.add_argument("--output", required=True, help="JSON file to write")

    listing = commands.add_parser("list", help="list methods, datasets, protocols, fold classes")
    listing.add_argument("--dataset", help="print this dataset's classes per fold")
    listing.add_argument("--data-root", help="dataset folder (for datasets read from disk)")
    listing.add_argument(
        "--split-style",
        choices=("consecutive", "interleaved"),
        help="COCO-20i fold convention (default: the protocol's)",
    )
    listing.add_argument("--protocol", default="panet", help="protocol whose defaults apply")

    report = commands.add_parser("report", help="tables and figures of a grid's results")
    report.add_argument("grid", nargs="?", default="quickstart", help="grid name or results folder")
    report.add_argument("--results", help=RESULTS_HELP)
    report.add_argument("--tracking-uri", help=TRACKING_HELP)

    qualitative = commands.add_parser(
        "qualitative", help="figure of episodes re-predicted from a cell's saved checkpoint"
    )
    qualitative.add_argument("grid", help="grid name or results folder")
    qualitative.add_argument("--cell", help="cell id (prefix); default: the best trained cell")
    qualitative.add_argument(
        "--episodes", type=int, nargs="+", default=[0, 1, 2, 3], help="episode indices to show"
    )
    qualitative.add_argument("--import", dest="imports", action="append", help=IMPORT_HELP)
    qualitative.add_argument("--results", help=RESULTS_HELP)

    ui = commands.add_parser("ui", help="serve the MLflow UI for the results store")
    ui.add_argument(
        "grid", nargs="?", default=None, help="grid whose runs view to open (default: latest)"
    )
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to serve on (default 127.0.0.1: this machine)",
    )
    ui.add_argument("--port", type=_at_least(1), default=5000, help="port (default 5000)")
    ui.add_argument(
        "--wait",
        type=float,
        default=120.0,
        help="seconds to wait for the server to answer before giving up (default 120)",
    )
    ui.add_argument("--results", help=RESULTS_HELP)
    ui.add_argument("--tracking-uri", help=TRACKING_HELP)

    prepare = commands.add_parser(
        "prepare",
        help="make a cross-domain test set from its official download (PATNet's layout)",
        description="deepglobe: Deepglobe's land-cover training set (<id>_sat.jpg, "
        "<id>_mask.png) → OUT/Deepglobe, cut into 6 × 6 tiles, filtered and split by class as "
        "PATNet's data/preprocess.py; isic2018: ISIC 2018 Task 1 (input images, ground truth) "
        "and a lesion-type CSV (ID,Class) → OUT/ISIC, one folder per lesion type.",
    )
    prepare.add_argument("dataset", choices=("deepglobe", "isic2018"), help="the test set to make")
    prepare.add_argument("raw", help="folder of the official download")
    prepare.add_argument("out", help="data root to write (then --data-root OUT in a grid)")
    prepare.add_argument(
        "--classes", help="isic2018: the lesion-type CSV (default: RAW/class_id.csv)"
    )

    sync = commands.add_parser("sync", help="push finished cells missing from MLflow")
    sync.add_argument("grid", nargs="?", default=None, help="grid name (default: every grid)")
    sync.add_argument("--results", help=RESULTS_HELP)
    sync.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser


def _add_run_options(parser):
    parser.add_argument("--import", dest="imports", action="append", help=IMPORT_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print cells, done state, resources")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="apply the grid's `smoke:` section (tiny, generated data) for a quick check",
    )
    parser.add_argument("--rerun", action="store_true", help="run finished cells again")
    parser.add_argument("--serial", action="store_true", help="run in-process without Ray")
    parser.add_argument("--ray-address", help="join an existing Ray cluster (or set RAY_ADDRESS)")
    parser.add_argument("--num-cpus", type=_at_least(1), help="CPUs of the local Ray instance")
    parser.add_argument(
        "--max-retries", type=_at_least(0), default=3, help="retries of a task whose worker dies"
    )
    parser.add_argument(
        "--eval-group",
        choices=("seed", "model"),
        default="model",
        help="Ray: one evaluation task per model (each image encoded once; default) or per seed",
    )
    parser.add_argument(
        "--eval-gpu-fraction",
        type=float,
        default=0.5,
        help="Ray: the GPU share of an evaluation task (default 0.5: two per GPU)",
    )
    parser.add_argument(
        "--threads",
        type=_at_least(1),
        help="torch threads per task (default: every available core with --serial, 1 per Ray task)",
    )
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--results", help=RESULTS_HELP)
    parser.add_argument("--data-root", help="dataset folder, replaces the grid's data_root")
    parser.add_argument(
        "--no-report", action="store_true", help="skip the tables and figures after the run"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    if not argv or argv[0].startswith("--") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", DEFAULT_GRID, *argv]
    # Overrides may come before, between or after options (`run g.yaml --dry-run shots=[1]`).
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "overrides", None) is not None:
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.error("no command given")
    previous = catch_sigterm()
    try:
        return {
            "config": cmd_config,
            "run": cmd_run,
            "manifest": cmd_manifest,
            "list": cmd_list,
            "report": cmd_report,
            "ui": cmd_ui,
            "qualitative": cmd_qualitative,
            "sync": cmd_sync,
            "prepare": cmd_prepare,
            "score": lambda a: cmd_score(a, cmd_run, _results_root),
        }[args.command](args)
    except FsbenchError as error:
        print(f"fsbench: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        return 0
    except KeyboardInterrupt as interruption:
        sigterm = terminated(interruption)
        what = "terminated (SIGTERM)" if sigterm else "interrupted"
        print(
            f"fsbench: {what}; finished cells are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 143 if sigterm else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
