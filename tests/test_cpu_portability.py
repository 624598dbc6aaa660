"""Every recorded-fixture comparison holds on any x86-64 CPU and thread count.

The suite itself runs the parity tests with all cores and the machine's best kernels (AVX-512 or
AVX2). This test runs the same files again in a fresh process with one thread and
`ATEN_CPU_CAPABILITY=default` (plain SSE kernels, another summation order), so a fixture whose
comparison depends on the CPU that recorded it fails on that very machine, not only on a user's
(issue 39: a float32 Adam step recorded on one CPU failed on an AVX-512 one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# The float comparisons; the replayed episodes (test_replay.py) are integer draws of seeded
# generators, the same on any CPU.
FIXTURE_TESTS = ("test_parity.py", "test_parity_hsnet_pfenet.py")
PORTABLE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
}


def _in_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **PORTABLE_ENV}
    return subprocess.run(
        [sys.executable, *args], cwd=TESTS.parent, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_fixture_comparisons_hold_on_one_thread_and_the_default_kernels():
    probe = _in_fresh_process(
        [
            "-c",
            "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())",
        ]
    )
    assert probe.stdout.split() == ["DEFAULT", "1"], probe.stderr  # the variation took effect
    result = _in_fresh_process(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(TESTS / f) for f in FIXTURE_TESTS)]
    )
    tail = "\n".join(result.stdout.splitlines()[-15:])
    assert result.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
