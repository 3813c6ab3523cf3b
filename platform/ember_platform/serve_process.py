"""``ember serve`` as a child process, started and waited for: what the benchmarks, the README
tests and scripts that drive a real server all need."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServeProcess", "free_port", "start_serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    base_url: str  # http://127.0.0.1:<port>
    key: str | None  # the bootstrap key, printed on a ledger's first start only
    log: str  # what it printed before serving

    def stop(self) -> int:
        """Ctrl-C, as a user would: uvicorn drains and the engine and ledger close; 0 if clean."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)


def start_serve(
    home: Path,
    *,
    port: int,
    args: Sequence[str] = (),
    timeout_s: float = 120.0,
    new_session: bool = False,
) -> ServeProcess:
    """Starts ``ember --home HOME serve --port PORT *args`` and returns once it accepts
    connections; raises RuntimeError with what it printed if it exits or times out.
    ``new_session``: in a process group of its own, which its zygote and workers join,
    so that a signal can reach all of them at once, as a terminal's or systemd's does."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ember_platform.cli",
            "--home",
            str(home),
            "serve",
            "--port",
            str(port),
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=new_session,
    )
    if proc.stderr is None:
        raise RuntimeError("ember serve was started without a stderr pipe")
    log = ""
    deadline = time.monotonic() + timeout_s
    while "serving" not in log:
        line = proc.stderr.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ember serve did not start:\n{log}")
        log += line
    while time.monotonic() < deadline:  # uvicorn binds just after the "serving" line
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            key = re.search(r"\b(ek_\S+)", log)
            return ServeProcess(proc, f"http://127.0.0.1:{port}", key and key.group(1), log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"ember serve printed 'serving' but never accepted a connection:\n{log}")
