"""The core every layer builds on, importing nothing of fsbench: the one user-facing error,
name → builder registries (and plugin loading), canonical hashing, private seeded generators,
atomic writes and the cache folder."""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import json
import math
import os
import pkgutil
import signal
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np


class FsbenchError(Exception):
    """A user-facing error: the message names the problem and the fix; the CLI prints it alone."""


MAX_MESSAGE_CHARS = 600


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message as one printable line of at most `limit` characters: control
    characters (a newline in a user's value) are shown escaped; a huge value is cut, saying so."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if len(text) > limit:
        text = f"{text[: limit - 40]}… ({len(text) - limit + 40} more characters)"
    return text


def short_repr(value, limit: int = 120) -> str:
    """repr(value) cut to `limit` characters (error messages quote what the user wrote)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def non_finite_path(value, path: str = "") -> str | None:
    """The key path of the first NaN or infinite number in nested dicts/lists, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "value"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, child in items:
        found = non_finite_path(child, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def canonical_sha256(obj) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, no spaces): equal data, equal digest."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def seeded_rng(*material) -> np.random.Generator:
    """A private generator seeded only by `material` (never the global RNG)."""
    return np.random.default_rng(int(canonical_sha256(list(material))[:32], 16))


def temp_name(path: Path) -> Path:
    """A temp file beside `path`, unique per process and thread (for an atomic os.replace)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temp file beside it, fsync, rename. A failed write (a
    full disk, a read-only folder) leaves neither a torn file nor the temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def default_cache_dir() -> Path:
    """`$FSBENCH_DATA`, else the user's cache folder (XDG_CACHE_HOME or ~/.cache) / fsbench:
    generated datasets, class indexes and (under weights/) ImageNet weights."""
    if os.environ.get("FSBENCH_DATA"):
        return Path(os.environ["FSBENCH_DATA"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "fsbench").resolve()


# Installed packages register methods and datasets through this entry-point group, e.g. in their
# pyproject.toml: [project.entry-points."fsbench.plugins"] my_methods = "my_pkg.methods"
PLUGIN_GROUP = "fsbench.plugins"
# ... and any process (driver, Ray worker) imports the modules this variable names, comma-separated
# (the test suite registers its small test-only variants this way).
PLUGIN_ENV = "FSBENCH_PLUGINS"
_entry_points_loaded = False


class Registry:
    """A named table of builders; registering a name twice is an error, not a silent replace."""

    def __init__(self, kind: str, packages: tuple[str, ...] = (), base: type | None = None):
        self.kind = kind
        self.base = base  # what every builder must build (a method's or dataset's base class)
        self._builders: dict[str, Callable] = {}
        self._display: dict[str, str] = {}  # name → how papers print it
        self._aliases: dict[str, str] = {}  # former name → name
        # Packages whose modules register into this table, all imported on first use: a bundled
        # method or dataset is added as one file, without a list to edit.
        self._packages = list(packages)

    def _load_builtins(self) -> None:
        while self._packages:
            package = importlib.import_module(self._packages.pop(0))
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{package.__name__}.{module.name}")
        load_entry_points()

    def register(self, name: str | None = None, *, display: str | None = None, aliases=()):
        """Decorator: register a builder under `name` (default: its own name), with the name
        papers print (`display`) and former names (`aliases`) that still find it."""

        def decorator(builder: Callable) -> Callable:
            key = name or builder.__name__
            for taken in (key, *aliases):
                if taken in self._builders or taken in self._aliases:
                    raise FsbenchError(
                        f"{self.kind} {taken!r} is registered twice; rename one of them"
                    )
            if display is not None and (not isinstance(display, str) or not display.strip()):
                raise FsbenchError(f"{self.kind} {key!r}: display {display!r} is not a name")
            self._builders[key] = builder
            if display:
                self._display[key] = display
            for alias in aliases:
                self._aliases[alias] = key
            return builder

        return decorator

    def canonical(self, name: str) -> str:
        """The registered name of `name` (itself, or the method a former name now is)."""
        self._load_builtins()
        return self._aliases.get(name, name)

    def display(self, name: str) -> str | None:
        """How papers print `name` (declared at registration), or None."""
        return self._display.get(self.canonical(name))

    def get(self, name: str) -> Callable:
        self._load_builtins()
        name = self._aliases.get(name, name)
        if name not in self._builders:
            close = difflib.get_close_matches(name, list(self._builders), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FsbenchError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.list())})"
            )
        return self._builders[name]

    def build(self, name: str, /, **kwargs):
        """Build `name` with `kwargs`; what it builds must be an instance of the base class."""
        built = self.get(name)(**kwargs)
        if self.base is not None and not isinstance(built, self.base):
            raise FsbenchError(
                f"{self.kind} {name!r} built a {type(built).__name__}, not a "
                f"{self.base.__name__}; subclass {self.base.__module__}.{self.base.__name__}"
            )
        return built

    def provides(self, name: str) -> type | None:
        """The class `name` builds, known without building it: the builder itself when it is a
        class, else its return annotation (`def my_set(...) -> MySet`); None when not declared."""
        builder = self.get(name)
        if isinstance(builder, type):
            return builder
        try:
            declared = typing.get_type_hints(builder).get("return")
        except Exception:  # noqa: BLE001 - an unresolvable annotation declares nothing
            return None
        return declared if isinstance(declared, type) else None

    def list(self, pattern: str = "*") -> list[str]:
        self._load_builtins()
        return sorted(n for n in self._builders if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._builders or name in self._aliases


def load_entry_points() -> None:
    """Import the modules $FSBENCH_PLUGINS names and those of the `fsbench.plugins` entry-point
    group (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib import metadata

    named = tuple(m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip())
    try:
        import_plugins(named)
    except FsbenchError as error:
        _entry_points_loaded = False
        raise FsbenchError(f"{PLUGIN_ENV}: {error}") from None
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
        except FsbenchError:
            raise  # a plugin's own clear message (e.g. a name registered twice)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the plugin's own bug
            what = f"exit({error.code})" if isinstance(error, SystemExit) else repr(error)[:300]
            raise FsbenchError(
                f"imports: importing {name!r} failed with {what}; fix that module "
                "(run `python -c 'import " + name + "'` to see its traceback)"
            ) from None


def manifest_fingerprint(spec: dict, episodes: list) -> str:
    """The fingerprint of an episode manifest: its spec and its episodes in their JSON form
    (kept here, torch-free, so that a result reader can check a manifest file it only reads)."""
    return canonical_sha256({"spec": spec, "episodes": episodes})


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or a user's `kill`), taken as an interruption: the driver stops the
    way Ctrl-C stops it (finished cells kept, the invocation recorded as killed), one line."""


_SIGTERM_RECEIVED = threading.Event()


def _raise_terminated(signum, frame):
    _SIGTERM_RECEIVED.set()  # Ray's blocking calls re-raise it as a plain KeyboardInterrupt
    raise Terminated()


def terminated(interruption: BaseException) -> bool:
    """Whether an interruption came from SIGTERM (even after Ray re-raised it as Ctrl-C)."""
    return isinstance(interruption, Terminated) or _SIGTERM_RECEIVED.is_set()


def catch_sigterm() -> Callable | int | None:
    """Make SIGTERM raise `Terminated` in the main thread (again after ray.init, which installs
    its own handler that exits through Ray's C++ teardown). Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)
