"""Loading weights saved by the official repositories onto fsbench's modules.

Each method names, per official parameter prefix, its own module; the tensors below a prefix
match one to one (same layer structure). `load_mapped_state_dict` strips DataParallel's
`module.`, maps the names, and refuses anything that does not fit, naming the tensors.
"""

from __future__ import annotations

import torch

from fsbench.core import FsbenchError


def _rename(key: str, names: dict[str, str]) -> str | None:
    for prefix in sorted(names, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            return names[prefix] + key[len(prefix) :]
    return None


def _few(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:4]) + (f" … ({len(keys)} in all)" if len(keys) > 4 else "")


def load_mapped_state_dict(
    model: torch.nn.Module,
    state_dict: dict,
    names: dict[str, str],
    method: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Load an official `state_dict` into `model` through the prefix map `names` (official →
    fsbench). `optional`: prefixes of fsbench parameters the official model lacks (they keep
    their values). BatchNorm's `num_batches_tracked` may be absent (checkpoints of old torch)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise FsbenchError(f"{method}: an official checkpoint must be a non-empty state dict")
    if all(k.startswith("module.") for k in state_dict):  # saved from nn.DataParallel
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    own = model.state_dict()
    mapped, unexpected = {}, []
    for key, value in state_dict.items():
        target = _rename(key, names)
        if target is None or target not in own:
            if not key.endswith("num_batches_tracked"):
                unexpected.append(key)
            continue
        mapped[target] = value
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [
        k
        for k in own
        if k not in mapped and not k.endswith("num_batches_tracked") and not k.startswith(optional)
    ]
    if unexpected or mismatched or missing:
        problems = [
            f"missing {_few(missing)}" if missing else "",
            f"not in {method}: {_few(unexpected)}" if unexpected else "",
            f"shape mismatch {_few(mismatched)}" if mismatched else "",
        ]
        raise FsbenchError(
            f"not an official {method} state dict ({'; '.join(p for p in problems if p)}); "
            "pass the `state_dict()` of the official model (a DataParallel `module.` prefix is "
            "fine) built with the same width and depth"
        )
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in mapped.items()}})
