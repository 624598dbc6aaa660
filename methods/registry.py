"""The method registry (builders of `FewShotMethod` modules)."""

from fsbench.core import Registry

METHODS = Registry("method")
