"""A process's CPU time, from /proc: what the benches charge a server or a pool."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (every thread), from /proc; None
    where there is no /proc (or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
