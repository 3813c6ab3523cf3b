"""Whether a process that wrote a file on this machine is still alive.

The file-backed tiers record writers by pid: a temp file names its writer
(``temp_name``, ``temp_writer_alive``), a host-tier pin or lease its holder. A pid alone
can be reused once its process is gone, so records that outlive seconds also keep the
process's start time (``start_time``), and ``alive`` tells a reused pid from the process
that wrote the record. No torch: a worker's readahead imports this before torch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TEMP_PREFIX", "alive", "start_time", "temp_name", "temp_writer_alive"]

# Temp files start with this and their writer's pid: a name starting with "." is never an
# object key, and whoever finds one can tell whether its writer may still rename it.
TEMP_PREFIX = ".tmp-"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; -1 for a zombie (it has
    exited and only waits to be reaped); None if it cannot be read (gone, or no /proc).

    Example::

        record = {"pid": os.getpid(), "start": start_time(os.getpid())}
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesized command name: state is field 3, starttime field 22.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return -1
    return int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs, and is the process that started at ``start`` (when given).

    Example::

        alive(record["pid"], record["start"])  # False once it exits or its pid is reused
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = start_time(pid)
    if now == -1:
        return False
    # A different start time means the pid was reused by an unrelated process.
    return start is None or now is None or now == start


def temp_name(tag: str) -> str:
    """A temp file's name for this process: ``TEMP_PREFIX``, the pid, then ``tag``.

    Example::

        temp = directory / temp_name(uuid.uuid4().hex)  # written, then renamed into place
    """
    return f"{TEMP_PREFIX}{os.getpid()}-{tag}"


def temp_writer_alive(name: str) -> bool:
    """Whether the process named in temp file ``name`` (see ``temp_name``) still runs:
    while it does, it may still rename the file into place; once it is gone, nobody will
    and the file can be removed. False for a name that is not such a temp file.

    Example::

        if not temp_writer_alive(path.name):
            path.unlink(missing_ok=True)
    """
    if not name.startswith(TEMP_PREFIX):
        return False
    pid_text = name.removeprefix(TEMP_PREFIX).split("-", 1)[0]
    return pid_text.isdigit() and alive(int(pid_text))
