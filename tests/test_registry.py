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
    # the package's own methods (plugins that tests import, e.g. vote_method, bring their own)
    real = [n for n in METHODS.list() if METHODS.get(n).__module__.startswith("fsbench.methods")]
    assert len(real) >= 9 and all(f"test_{n}" in METHODS for n in real)


def test_registry_is_typed_by_its_base_class():
    class Base:
        pass

    class Good(Base):
        pass

    registry = Registry("widget", base=Base)

    @registry.register()
    def good() -> Good:
        return Good()

    @registry.register()
    def bad():
        return object()

    assert isinstance(registry.build("good"), Good)
    assert registry.provides("good") is Good and registry.provides("bad") is None
    with pytest.raises(FsbenchError, match="built a object, not a Base; subclass"):
        registry.build("bad")
    DATASETS.register("not_a_dataset")(lambda **kw: object())
    try:
        with pytest.raises(FsbenchError, match="not a FewShotDataset"):
            DATASETS.build("not_a_dataset")
    finally:
        DATASETS._builders.pop("not_a_dataset")


def test_grid_reads_trainable_off_the_class_without_building(small_grid_dict):
    """Expanding a grid checks a method's keywords against its builder but builds no model
    (a real method would load its weight file just to say whether it trains)."""
    from fsbench.benchmarks.grid.files import parse_grid
    from fsbench.methods.panet import UntrainedPANet

    built = []

    @METHODS.register("counted_notrain")
    def counted_notrain(alpha=20.0) -> UntrainedPANet:
        built.append(alpha)
        return UntrainedPANet(alpha=alpha, width=1 / 16)

    try:
        grid = parse_grid({**small_grid_dict, "methods": [{"name": "counted_notrain"}]})
        cells = grid.expand()
        assert cells and all(c.train is None for c in cells) and built == []
        bad = {**small_grid_dict, "methods": [{"name": "counted_notrain", "kwargs": {"beta": 1}}]}
        with pytest.raises(FsbenchError, match="bad keyword"):
            parse_grid(bad).expand()
    finally:
        METHODS._builders.pop("counted_notrain")


@pytest.mark.slow
def test_the_package_registers_no_test_variants():
    """tests/small_methods.py registers the suite's tiny variants through $FSBENCH_PLUGINS;
    a user's process (no such variable) sees only the real methods."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FSBENCH_PLUGINS"}
    listed = subprocess.run(
        [sys.executable, "-c", "from fsbench.methods import METHODS; print(METHODS.list())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    names = eval(listed.stdout)  # noqa: S307 - a list of names this test printed
    assert "panet" in names and not [n for n in names if n.startswith("test_")]
    assert "test_panet" in METHODS  # this process: the plugin is loaded
