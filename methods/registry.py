"""The method registry (builders of `FewShotMethod` modules)."""

from fsbench.datasets.registry import Registry

METHODS = Registry("method")
