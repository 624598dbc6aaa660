"""Name → builder registries (methods, datasets) and the one error type users see."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import sys
from collections.abc import Callable

# Installed packages register methods and datasets through this entry-point group, e.g. in their
# pyproject.toml: [project.entry-points."fsbench.plugins"] my_methods = "my_pkg.methods"
PLUGIN_GROUP = "fsbench.plugins"
_entry_points_loaded = False


class FsbenchError(Exception):
    """A user-facing error: the message names the problem and the fix; the CLI prints it alone."""


class Registry:
    """A named table of builders; registering a name twice is an error, not a silent replace."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self._builders: dict[str, Callable] = {}
        self._builtins = list(builtins)  # modules registering into this table, imported on use

    def _load_builtins(self) -> None:
        while self._builtins:
            importlib.import_module(self._builtins.pop(0))
        load_entry_points()

    def register(self, name: str | None = None):
        def decorator(builder: Callable) -> Callable:
            key = name or builder.__name__
            if key in self._builders:
                raise FsbenchError(f"{self.kind} {key!r} is registered twice; rename one of them")
            self._builders[key] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable:
        self._load_builtins()
        if name not in self._builders:
            close = difflib.get_close_matches(name, list(self._builders), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FsbenchError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.list())})"
            )
        return self._builders[name]

    def list(self, pattern: str = "*") -> list[str]:
        self._load_builtins()
        return sorted(n for n in self._builders if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._builders


DATASETS = Registry("dataset", builtins=("fsbench.datasets.pascal", "fsbench.datasets.coco"))


def load_entry_points() -> None:
    """Import every module of the `fsbench.plugins` entry-point group (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib import metadata

    for entry in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin is named, not a traceback
            _entry_points_loaded = False
            raise FsbenchError(
                f"plugin {entry.name!r} ({entry.value}, entry point group {PLUGIN_GROUP}) failed "
                f"to import: {type(error).__name__}: {error}; fix or uninstall it"
            ) from None


def import_plugins(modules=(), paths=()) -> None:
    """Import the modules a grid (`imports:`) or the CLI (`--import`) names, so that the
    methods and datasets they register exist, in the driver and in every worker task. `paths`
    (e.g. the grid file's folder) are put on sys.path first."""
    if not modules:
        return
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)  # after the installed packages: a grid folder shadows nothing
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            where = f" (searched also {', '.join(paths)})" if paths else ""
            raise FsbenchError(
                f"imports: cannot import {name!r} ({error}){where}; install it, or put it next "
                "to the grid file or on PYTHONPATH (on a cluster: on every node)"
            ) from None
