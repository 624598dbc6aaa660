"""Name → builder registries (methods, datasets) and the one error type users see."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable


class FsbenchError(Exception):
    """A user-facing error: the message names the problem and the fix; the CLI prints it alone."""


class Registry:
    """A named table of builders; registering a name twice is an error, not a silent replace."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self._builders: dict[str, Callable] = {}
        self._builtins = list(builtins)  # modules registering into this table, imported on use

    def _load_builtins(self) -> None:
        import importlib

        while self._builtins:
            importlib.import_module(self._builtins.pop(0))

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
