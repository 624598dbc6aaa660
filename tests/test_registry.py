import pytest

from fsbench.core import FsbenchError, Registry
from fsbench.datasets.registry import DATASETS
from fsbench.methods import METHODS


def test_duplicate_name_raises():
    registry = Registry("thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(FsbenchError, match="registered twice"):
        registry.register("a")(lambda: 2)


def test_unknown_name_lists_close_matches():
    with pytest.raises(FsbenchError, match="did you mean panet") as error:
        METHODS.get("pannet")
    assert "panet_nopar" in str(error.value)


def test_list_filters_by_pattern():
    assert METHODS.list("test_*") == sorted(n for n in METHODS.list() if n.startswith("test_"))
    assert {"panet", "panet_nopar", "prototype_notrain", "all_background", "all_foreground"} <= set(
        METHODS.list()
    )
    assert {"pascal5i", "synthetic_pascal5i"} <= set(DATASETS.list())


def test_every_method_has_a_test_variant():
    real = [n for n in METHODS.list() if not n.startswith("test_")]
    assert all(f"test_{n}" in METHODS for n in real)
