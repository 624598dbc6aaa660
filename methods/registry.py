"""The method registry, typed by `FewShotMethod`: every module of fsbench.methods registers its
own builders (a new bundled method is one new file)."""

from fsbench.core import Registry
from fsbench.methods.base import FewShotMethod

METHODS = Registry("method", packages=("fsbench.methods",), base=FewShotMethod)
