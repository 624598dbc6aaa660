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
