"""How a worker process comes to exist: a fresh interpreter, or a fork of the zygote.

A ``Launcher`` turns worker arguments (``python -m ember_functions.worker``'s flags) into a
running process and hands back a ``Launched``: its pid, and ``poll``/``wait``/``kill`` with
``subprocess.Popen``'s meaning, whoever its parent is. ``WorkerProcess.spawn`` takes either.

- ``SubprocessLauncher``: ``python -m ember_functions.worker``; every start pays for an
  interpreter and the imports (torch alone is ~1-2 s).
- ``Zygote``: a fork server (``ember_functions.zygote``) that imported all of that once; a
  start is a ``fork()``. Its children are the zygote's, not ours, so their exits reach us
  as messages from it.

Example::

    with Zygote.start(zygote_id="z1") as zygote:
        worker = WorkerProcess.spawn(worker_id="w1", model=name, home=home, launcher=zygote)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ember_core import EngineError
from ember_functions.rpc import FrameReader, FrameWriter

if TYPE_CHECKING:
    from ember_functions.loading import WeightsSource

__all__ = [
    "Launched",
    "Launcher",
    "SubprocessLauncher",
    "Zygote",
    "accept",
    "socket_path",
    "start_connected",
]

log = logging.getLogger(__name__)


class Launched(Protocol):
    """A started worker process, as ``subprocess.Popen`` describes one."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


_P = TypeVar("_P", bound=Launched)


class Launcher(Protocol):
    def launch(self, worker_args: Sequence[str]) -> Launched: ...

    def prepare(self, tokenizer_dir: Path, *, weights: WeightsSource | None = None) -> None:
        """Readies what the workers launched from now on can share: the tokenizer in
        ``tokenizer_dir``, parsed, and ``weights``' chunks on this machine, checked (a
        pool calls it when its first worker is READY)."""


def socket_path(name: str, run_dir: Path | None = None) -> Path:
    """Where process ``name`` (a worker or zygote id) connects to its router: derived from
    the id, in a directory only this user can enter. Short on purpose: a Unix socket path
    is at most 107 bytes."""
    base = run_dir or Path(tempfile.gettempdir()) / f"ember-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base / f"w-{name}.sock"


def accept(listener: socket.socket, proc: Launched, what: str, timeout_s: float) -> socket.socket:
    """The child's connection, or a clear error if it exited or hung before connecting."""
    listener.settimeout(0.1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            sock, _ = listener.accept()
            sock.settimeout(None)
            return sock
        except TimeoutError:
            code = proc.poll()
            if code is not None:
                raise EngineError(
                    f"{what} exited with code {code} before connecting; its log above says why"
                ) from None
    proc.kill()
    raise EngineError(f"{what} did not connect within {timeout_s:.0f} s")


def start_connected(
    name: str,
    start: Callable[[Path], _P],
    *,
    what: str,
    run_dir: Path | None = None,
    timeout_s: float,
) -> tuple[_P, socket.socket]:
    """Listens on ``name``'s socket, runs ``start`` (given the socket's path, it starts
    the process that connects there) and returns the process and its connection. The
    socket's name is gone on return, connected or failed: nothing else may connect."""
    path = socket_path(name, run_dir)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        proc = start(path)
        return proc, accept(listener, proc, what, timeout_s)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


class SubprocessLauncher:
    """A new interpreter per worker."""

    def launch(self, worker_args: Sequence[str]) -> Launched:
        argv = [sys.executable, "-m", "ember_functions.worker", *worker_args]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def prepare(self, tokenizer_dir: Path, *, weights: WeightsSource | None = None) -> None:
        """Nothing: a new interpreter inherits nothing, so each worker parses and checks
        its own (while it imports torch)."""


# The exit code of a worker whose zygote died before reporting it, and that this process
# did not reap itself: unknown.
UNKNOWN_EXIT = 255


class _Forked:
    """A child of the zygote; its exit code arrives as a message, or, once the zygote is
    gone (``orphaned``), from the pid itself."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.orphaned = False  # set when the zygote, which reports its exit, is gone
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        if self.returncode is None and self.orphaned:
            code = _exit_of_orphan(self.pid)
            if code is not None:
                self._set_exit(code)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            # In slices: the zygote can die while this waits, and then nobody would set
            # the event (an orphan is looked at through its pid instead).
            self._exited.wait(0.1 if left is None else min(left, 0.1))
        return code

    def kill(self) -> None:
        if self.returncode is None:
            # If it exited already, the zygote reports the code.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _exit_of_orphan(pid: int) -> int | None:
    """The exit code of a forked worker whose zygote is gone, None while it runs. An
    orphan is re-parented: to init, which reaps it, or to this process where this is
    PID 1 or a subreaper (a container's entry point), which must reap it."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not this process's child: someone else reaps it
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or the pid reused)
            return UNKNOWN_EXIT
        return None
    return os.waitstatus_to_exitcode(status) if reaped else None


class Zygote:
    """The router's handle on one fork server. Build with :meth:`start`."""

    def __init__(self, zygote_id: str, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.zygote_id = zygote_id
        self.proc = proc
        self.imports_s = 0.0  # what each fork saves
        self._sock = sock
        self._reader = FrameReader(sock)
        self._writer = FrameWriter(sock)
        self._request_lock = threading.Lock()  # one request (fork, prepare) in flight
        self._replies: list[dict[str, Any]] = []
        self._reply = threading.Condition()
        self._children: dict[int, _Forked] = {}
        self._early_exits: dict[int, int] = {}  # exits reported before the fork reply
        self._closed = False

    @classmethod
    def start(
        cls, *, zygote_id: str, run_dir: Path | None = None, timeout_s: float = 120.0
    ) -> Zygote:
        """Starts the fork server and returns once it has imported everything."""
        argv = [sys.executable, "-m", "ember_functions.zygote", "--zygote-id", zygote_id]
        proc, sock = start_connected(
            f"z-{zygote_id}",
            lambda path: subprocess.Popen([*argv, "--socket", str(path)], stdin=subprocess.DEVNULL),
            what=f"zygote {zygote_id}",
            run_dir=run_dir,
            timeout_s=timeout_s,
        )
        zygote = cls(zygote_id, proc, sock)
        sock.settimeout(timeout_s)
        try:
            hello = zygote._reader.read()
        except TimeoutError:
            proc.kill()
            raise EngineError(f"zygote {zygote_id} did not finish its imports") from None
        if hello is None or hello["op"] != "ready":
            proc.kill()
            raise EngineError(f"zygote {zygote_id} exited during its imports; see its log")
        sock.settimeout(None)
        zygote.imports_s = float(hello["imports_s"])
        threading.Thread(
            target=zygote._read_loop, name=f"ember-zygote-{zygote_id}", daemon=True
        ).start()
        return zygote

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def launch(self, worker_args: Sequence[str]) -> Launched:
        with self._request_lock:
            reply = self._request({"op": "fork", "args": list(worker_args)}, "a fork")
            pid = int(reply["pid"])
            with self._reply:
                child = _Forked(pid)
                self._children[pid] = child
                if pid in self._early_exits:
                    child._set_exit(self._early_exits.pop(pid))
            return child

    def prepare(self, tokenizer_dir: Path, *, weights: WeightsSource | None = None) -> None:
        """Has the zygote parse the tokenizer in ``tokenizer_dir`` once, and check the
        chunks of ``weights`` held on this machine once, so the workers it forks from
        now on start with it parsed and map them without hashing them. What fails here
        is left to the workers, which report why."""
        message: dict[str, Any] = {"op": "prepare", "tokenizer_dir": str(tokenizer_dir)}
        if weights is not None:
            message["weights"] = weights.to_dict()
        with self._request_lock:
            reply = self._request(message, "prepare")
        if reply.get("error"):
            log.warning(
                "zygote %s could not prepare %s: %s",
                self.zygote_id,
                tokenizer_dir,
                reply["error"],
            )

    def _request(self, message: dict[str, Any], what: str) -> dict[str, Any]:
        """Sends one request and waits for its reply (under ``_request_lock``: the zygote
        answers strictly one at a time, in order)."""
        if not self.alive:
            raise EngineError(
                f"zygote {self.zygote_id} is not running; start a new one "
                "(or launch workers as new interpreters)"
            )
        self._writer.send(message)
        with self._reply:
            while not self._replies:
                answered = self._reply.wait(timeout=30)
                if (not answered or not self.alive) and not self._replies:
                    raise EngineError(f"zygote {self.zygote_id} did not answer {what}")
            return self._replies.pop(0)

    def _read_loop(self) -> None:
        try:
            while (message := self._reader.read()) is not None:
                with self._reply:
                    if message["op"] in ("forked", "prepared"):
                        self._replies.append(message)
                        self._reply.notify_all()
                    elif message["op"] == "exited":
                        pid, code = int(message["pid"]), int(message["code"])
                        child = self._children.pop(pid, None)
                        if child is None:
                            self._early_exits[pid] = code
                        else:
                            child._set_exit(code)
        except (OSError, EngineError, ValueError):
            pass
        with self._reply:
            self._closed = True
            self._reply.notify_all()
            # Nobody reports these children's exits any more: they are watched by pid.
            for child in self._children.values():
                child.orphaned = True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the fork server. Its children keep running until their routers let go."""
        self._closed = True
        # shutdown, not only close: the reader's makefile() keeps the descriptor open, so
        # close() alone sends no EOF and the zygote would wait out timeout_s for its kill.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
