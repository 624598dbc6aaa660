"""Few-shot segmentation methods; `METHODS.get(name)(**kwargs)` builds one."""

from fsbench.methods import bounds, canet, finetune, panet, sgone  # noqa: F401  (registration)
from fsbench.methods.registry import METHODS

__all__ = ["METHODS"]
