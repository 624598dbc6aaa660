"""Every weight file fsbench reads goes through here: ImageNet backbones (torchvision files),
released official checkpoints, and fsbench's own saved models.

`read_state_dict` opens a torch file (tensors only, never arbitrary objects), unwraps the
containers training scripts save ({"state_dict": …}, {"model": …}, a whole module) and names the
problem and the fix in one line. `load_mapped_state_dict` puts an official state dict onto
fsbench's modules: each method names, per official parameter prefix, its own module; the tensors
below a prefix match one to one. It strips DataParallel's `module.`, maps the names, and refuses
anything that does not fit, naming the tensors.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from fsbench.core import FsbenchError, default_cache_dir


def imagenet_weights_path(filename: str) -> Path:
    """Where named ImageNet weights live: $FSBENCH_WEIGHTS, else the fsbench cache's weights/."""
    folder = os.environ.get("FSBENCH_WEIGHTS")
    return (Path(folder).expanduser() if folder else default_cache_dir() / "weights") / filename


def read_state_dict(path, what: str, fix: str, sha256: str | None = None) -> dict:
    """The state dict in the torch file `path` (`what` it should be, `fix` when it is missing).

    The file is read once: its bytes are hashed as read and those very bytes are loaded, so with
    `sha256` (the digest recorded when the grid was read) a file replaced in between is refused
    instead of scored under the old digest. Non-finite weights are refused, naming the tensor."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FsbenchError(f"{path}: is a directory, not a {what}; {fix}")
    if not path.is_file():
        raise FsbenchError(f"{path}: {what} not found; {fix}")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FsbenchError(
            f"{path}: {what} changed since the grid was read (sha256 {sha256[:12]} then, "
            f"{hashlib.sha256(data).hexdigest()[:12]} now); rerun to score the file as it is now"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        # one line (torch's own message runs to a page, and a Ray error keeps only its last
        # line): the file, what is wrong, the fix
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(error).__name__
        raise FsbenchError(
            f"{path}: not a readable torch {what} ({type(error).__name__}: {reason}); it must "
            "hold tensors only — re-save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise FsbenchError(f"{path}: holds a {type(state).__name__}, not a {what} (a state dict)")
    for name, tensor in state.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FsbenchError(
                f"{path}: tensor {name} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                f"a {what} with non-finite weights would score as a silent 0 — use a finite one"
            )
    return state


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
