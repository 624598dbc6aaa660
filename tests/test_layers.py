"""The layering ARCHITECTURE.md draws, checked on the source: imports only go downward
(core ← datasets ← methods ← engine ← report / CLI / API), module-level imports have no loop,
fsbench modules import each other lazily only where that keeps torch, ray or MLflow off a light
path, and no module grows past ~400 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fsbench", "datasets", "methods", "benchmarks")
# Bottom to top: a module may import its own layer and the ones below it, never one above.
# The engine's subpackages are layers of their own, in the order benchmarks/__init__ lists them.
LAYERS = (
    ("fsbench.core",),
    ("fsbench.datasets",),
    ("fsbench.methods",),
    ("fsbench.benchmarks.metrics",),
    ("fsbench.benchmarks.grid",),
    ("fsbench.benchmarks.store",),
    ("fsbench.benchmarks.training", "fsbench.benchmarks.evaluation"),
    ("fsbench.benchmarks.execution",),
    ("fsbench.benchmarks.tracking",),
    ("fsbench.benchmarks.report",),
    ("fsbench.benchmarks.cli", "fsbench"),  # `import fsbench` is the API the CLI also serves
    ("fsbench.benchmarks.tools",),
)
# Lazy fsbench imports, each keeping a heavy library off a light path: `import fsbench` and the
# report import no torch; `fsbench --help` / `list` start fast; results load without torch.
LAZY_ALLOWED = {
    "fsbench",
    "fsbench.benchmarks.cli.api",
    "fsbench.benchmarks.cli.commands",
    "fsbench.benchmarks.cli.mlflow_commands",
    "fsbench.benchmarks.store.results",
}
MAX_LINES = 420


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = parts[1:] if parts[0] == "fsbench" else parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(["fsbench", *parts])


def _layer(module: str) -> int:
    """The rank of the longest layer prefix of `module` (`fsbench.benchmarks` itself: its map)."""
    best, rank = -1, len(LAYERS)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def test_every_engine_module_sits_in_a_declared_layer():
    modules, _ = _imports()
    engine = [m for m in modules if m.startswith("fsbench.benchmarks.")]
    assert len(engine) > 30
    assert [m for m in engine if _layer(m) < 3] == []  # none falls through to fsbench itself
    for prefixes in LAYERS[3:]:
        for prefix in prefixes:
            assert prefix in modules, f"{prefix}: a declared layer that does not exist"


def test_parsing_a_grid_imports_no_trainer_worker_or_evaluator():
    modules, found = _imports()
    graph = {m: {t for t, top in edges if top} for m, edges in found.items()}
    reached, todo = set(), ["fsbench.benchmarks.grid.files"]
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph.get(node, ()))
    heavy = ("training", "execution", "evaluation", "tracking")
    assert [m for m in reached if m.split(".")[2:3] and m.split(".")[2] in heavy] == []


def _imports():
    modules = {_module(p): p for d in PACKAGES for p in (ROOT / d).rglob("*.py")}
    found = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module or ""]
            else:
                continue
            for target in (t for t in targets if t.split(".")[0] == "fsbench"):
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                edges.append((target, node in tree.body))
        found[name] = edges
    return modules, found


def test_imports_go_downward_without_loops():
    modules, found = _imports()
    assert len(modules) > 40
    upward = [
        f"{m} -> {t}" for m, edges in found.items() for t, _ in edges if _layer(t) > _layer(m)
    ]
    assert upward == []
    lazy = sorted({m for m, edges in found.items() for t, top in edges if not top and t != m})
    assert set(lazy) <= LAZY_ALLOWED, lazy
    graph = {m: {t for t, top in edges if top and t != m} for m, edges in found.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import loop: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_core_imports_nothing_of_fsbench_and_no_module_is_a_god_module():
    _, found = _imports()
    assert found["fsbench.core"] == []
    long = {
        str(p.relative_to(ROOT)): n
        for d in PACKAGES
        for p in (ROOT / d).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
