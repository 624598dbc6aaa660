"""Reading YAML a user wrote (grid files, overrides, `--kwarg` values): safe (no object is ever
constructed from a tag), numbers as users write them, and within a size budget."""

from __future__ import annotations

import re

import yaml

from fsbench.core import FsbenchError


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that `1e-3` is the float users mean (PyYAML wants
    `1.0e-3` and otherwise returns the string '1e-3')."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


YAML_MAX_CHARS = 1_000_000
YAML_MAX_VALUES = 100_000  # after alias expansion; the largest bundled grid has a few hundred


def load_yaml(text: str):
    """Safe YAML (no object construction) with numbers as users write them, within a budget:
    a document over YAML_MAX_CHARS, or whose aliases expand it past YAML_MAX_VALUES values (an
    alias bomb: a few lines that every later walk — hashing, printing — would take hours or
    gigabytes over) is refused as invalid YAML before anything is built from it."""
    if len(text) > YAML_MAX_CHARS:
        raise yaml.YAMLError(f"{len(text)} characters, over the {YAML_MAX_CHARS} a grid may have")
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root) -> int:
    """How many values the node graph holds with every alias expanded (memoised per node, so a
    bomb is measured in microseconds); raises yaml.YAMLError past the budget or on a cycle."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.YAMLError("an alias refers to a value that contains it (a cycle)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > YAML_MAX_VALUES:
            raise yaml.YAMLError(
                f"its aliases (&anchor / *alias) expand it to over {YAML_MAX_VALUES} values; "
                "write the values out or remove the nested aliases"
            )
        sizes[key] = total
        return total

    return size(root)


def load_value(text: str, where: str, fix: str):
    """One value a user typed (an override, a `--kwarg`), as safe YAML; invalid YAML — or a tag
    asking to build an object — is one line naming `where` and the `fix`."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise FsbenchError(f"{where}: the value is not valid YAML ({problem}); {fix}") from None
