"""Few-shot segmentation methods; `METHODS.get(name)(**kwargs)` builds one."""

from fsbench.methods import bounds, panet  # noqa: F401  (register the built-in methods)
from fsbench.methods.registry import METHODS

__all__ = ["METHODS"]
