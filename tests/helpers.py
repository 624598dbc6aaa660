"""Helpers shared by tests that start processes: they stop what they started, by PID."""

from __future__ import annotations

import os
from pathlib import Path


def session_members(sessions: set[int]) -> list[int]:
    """PIDs of the live processes in these sessions (each started with start_new_session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) in sessions:
                found.append(int(entry))
    return found


def seeded_state_dict(entries, seed: int = 0, gain: float = 1.0) -> dict:
    """A state dict of deterministic random tensors for [(name, shape, dtype)], in order: conv and
    linear weights ~ N(0, gain²·2/fan_in), biases and BatchNorm shifts and means ~ N(0, 0.1²),
    BatchNorm scales near 1, running variances positive (activations stay finite through deep
    networks). The parity fixtures were recorded by loading the same tensors into the official
    models."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in entries:
        if not str(dtype).startswith("torch.float"):
            state[name] = torch.zeros(shape, dtype=torch.int64)  # num_batches_tracked
            continue
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            value = 1 + noise.abs() * 0.1
        elif len(shape) > 1:  # conv / linear weight
            fan_in = 1
            for side in shape[1:]:
                fan_in *= side
            value = noise * gain * (2.0 / fan_in) ** 0.5
        elif name.endswith("weight"):  # BatchNorm scale
            value = 1 + noise * 0.1
        else:  # biases, BatchNorm shift and running mean
            value = noise * 0.1
        state[name] = value.to(torch.float32)
    return state


def parity_episode(size: int, shots: int):
    """The parity fixtures' episode: seeded query [1, 3, S, S], supports [K, 3, S, S] and
    rectangular masks [K, S, S] (shared by tests/test_parity.py and its recorder)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, size, size, generator=generator)
    supports = [torch.randn(1, 3, size, size, generator=generator) for _ in range(shots)]
    masks = []
    for shot in range(shots):
        mask = torch.zeros(1, size, size)
        mask[:, 12 + shot : 36 + shot, 15 - shot : 40 - 2 * shot] = 1
        masks.append(mask)
    return query, torch.cat(supports), torch.cat(masks)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`fsbench ARGS` in this process: (exit code, stdout, stderr)."""
    from fsbench.benchmarks.cli.main import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, says: str) -> bool:
    """Whether stderr is exactly one `fsbench: error:` line saying `says`."""
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("fsbench: error:") and says in lines[0]
