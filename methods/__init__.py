"""Few-shot segmentation methods; `METHODS.build(name, **kwargs)` builds one. Every module of this
package registers its own (imported on the registry's first use)."""

from fsbench.methods.registry import METHODS

__all__ = ["METHODS"]
