"""The layering ARCHITECTURE.md draws, checked on the source: imports only go downward
(core ← datasets ← methods ← engine ← report / CLI / API), module-level imports have no loop,
fsbench modules import each other lazily only where that keeps torch, ray or MLflow off a light
path, and no module grows past ~400 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fsbench", "datasets", "methods", "benchmarks")
TOP = {  # the report, the command line, the public API and the measurement scripts
    "fsbench",
    "fsbench.benchmarks.api",
    "fsbench.benchmarks.cli",
    "fsbench.benchmarks.commands",
    "fsbench.benchmarks.qualitative",
    "fsbench.benchmarks.throughput",
    "fsbench.benchmarks.measure_scheduling",
    "fsbench.benchmarks.protocol_episode",
}
# Lazy fsbench imports, each keeping a heavy library off a light path: `import fsbench` and the
# report import no torch; `fsbench --help` / `list` start fast; results load without torch.
LAZY_ALLOWED = {
    "fsbench",
    "fsbench.benchmarks.api",
    "fsbench.benchmarks.commands",
    "fsbench.benchmarks.results",
}
MAX_LINES = 420


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = parts[1:] if parts[0] == "fsbench" else parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(["fsbench", *parts])


def _layer(module: str) -> int:
    if module in TOP or module.startswith("fsbench.benchmarks.report"):
        return 4
    if module == "fsbench.core":
        return 0
    for layer, prefix in enumerate(("", "fsbench.datasets", "fsbench.methods")):
        if prefix and module.startswith(prefix):
            return layer
    return 3  # the engine: the rest of fsbench.benchmarks


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
