"""`fsbench score`: one released checkpoint scored under several lineages' protocols from one line.

A thin front of a generated grid: the grid it writes (`<results>/<name>.grid.yaml`, re-runnable
with `fsbench run`) has one `checkpoint:` method entry and `eval_protocols:`; its results, MLflow
runs and report are those of any grid."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from fsbench.benchmarks.grid.yaml_text import load_value
from fsbench.core import FsbenchError, atomic_write_text, non_finite_path
from fsbench.datasets.protocols import PROTOCOLS


def add_score_parser(commands, add_run_options, at_least) -> None:
    score = commands.add_parser(
        "score",
        help="score one checkpoint under several protocols (a generated grid)",
        description="Score a released (or saved) checkpoint under several lineages' protocols: "
        "each protocol's own test episodes, resizing, padding and scoring, side by side.",
    )
    score.add_argument("--method", required=True, help="registered method (see `list`)")
    score.add_argument("--checkpoint", required=True, help="weights file (.pt/.pth/.tar)")
    score.add_argument(
        "--format",
        choices=("official", "fsbench"),
        default="official",
        help="official: a state_dict the method's official code saved (default); fsbench: ours",
    )
    score.add_argument(
        "--kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method keyword (YAML value), repeatable, e.g. --kwarg backbone=resnet101",
    )
    score.add_argument("--dataset", default="pascal5i", help="dataset name (see `list`)")
    score.add_argument("--fold", type=at_least(0), nargs="+", default=[0], help="test fold(s)")
    score.add_argument("--shots", type=at_least(1), nargs="+", default=[1, 5], help="shots")
    score.add_argument(
        "--protocols",
        nargs="+",
        default=list(DEFAULT_PROTOCOLS),
        help=f"protocols to score under, of {', '.join(PROTOCOLS)} (default: "
        f"{' '.join(DEFAULT_PROTOCOLS)}; bam and hdmnet replay PFENet's loader with 5 and 10 "
        "seeds)",
    )
    score.add_argument("--episodes", type=at_least(1), help="per fold and seed (default: each's)")
    score.add_argument("--input-size", type=at_least(16), help="default: each protocol's")
    score.add_argument("--name", help="grid name (default: score_<method>_<dataset>_<sha8>)")
    add_run_options(score)


# The three lineages' own test scripts; bam and hdmnet (PFENet's mechanics, more seeds) on request.
DEFAULT_PROTOCOLS = ("panet", "pfenet", "hsnet")


def score_grid(args) -> dict:
    """The grid `fsbench score` runs, as a dict (what it writes as YAML)."""
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    if checkpoint.is_dir():
        raise FsbenchError(
            f"--checkpoint {args.checkpoint}: is a directory; pass the weights file inside it"
        )
    if not checkpoint.is_file():
        raise FsbenchError(f"--checkpoint {args.checkpoint}: no such file; pass a weights file")
    unknown = [p for p in args.protocols if p not in PROTOCOLS]
    if unknown or len(set(args.protocols)) != len(args.protocols):
        raise FsbenchError(
            f"--protocols {' '.join(args.protocols)}: name distinct protocols of "
            f"{', '.join(PROTOCOLS)}"
        )
    kwargs = {}
    for item in args.kwarg:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise FsbenchError(f"--kwarg {item!r}: write KEY=VALUE, e.g. --kwarg layers=50")
        kwargs[key] = load_value(
            value, f"--kwarg {item!r}", "write a number, a word or a list, e.g. --kwarg alpha=20"
        )
        if non_finite_path(kwargs[key]):
            raise FsbenchError(f"--kwarg {item!r}: NaN or infinity is not a setting")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    name = args.name or f"score_{args.method}_{args.dataset}_{digest[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
        raise FsbenchError(f"--name {name!r}: use only letters, digits, '_', '.' and '-'")
    dataset = {"name": args.dataset}
    if args.data_root:
        dataset["data_root"] = str(Path(args.data_root).expanduser().resolve())
    entry = {"name": args.method, "checkpoint": str(checkpoint), "format": args.format}
    if kwargs:
        entry["kwargs"] = kwargs
    grid = {
        "name": name,
        "dataset": dataset,
        "protocol": args.protocols[0],  # no training: it only names the cells' home protocol
        "eval_protocols": list(args.protocols),
        "folds": list(args.fold),
        "shots": list(args.shots),
        "methods": [entry],
    }
    if args.episodes:
        grid["episodes"] = args.episodes
    if args.input_size:
        grid["input_size"] = args.input_size
    if args.imports:
        grid["imports"] = list(args.imports)
    return grid


def cmd_score(args, run_command, results_root) -> int:
    """Write the generated grid beside the results, then run it as `fsbench run` would."""
    grid = score_grid(args)
    root = results_root(args)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{grid['name']}.grid.yaml"
    header = "# Written by `fsbench score`; rerun with: fsbench run " + str(path) + "\n"
    atomic_write_text(path, header + yaml.safe_dump(grid, sort_keys=False))
    print(f"fsbench score: grid {path}")
    args.grid, args.overrides, args.smoke, args.imports = str(path), [], False, None
    args.data_root = None  # already in the grid
    return run_command(args)
