"""A new worker's readahead, in a forked child: it reads, fetches and checks beside
``import torch``, not in turns with it.

A worker in a new interpreter brings its model to the machine while its main thread
imports torch (``WeightsSource.read_ahead``): chunks on the disk read into the page cache
and checksummed; chunks only in the object store fetched, decoded, checked and written
into the host tier, where there is one; the tokenizer's files written. The loader then finds them
there, checked, and reads neither them nor the manifest again.

On a thread of the worker's own that work would take turns with the import at the GIL:
each of its hundreds of reads and hashes has to win the GIL back from the import to go
on. A child forked first thing, before the worker has any thread, has an interpreter and
a GIL of its own, and the page cache and the cache tiers it fills are the machine's.
Measured on the 1.1B model from an evicted disk tier (2 cores): the import and
the readahead done together in 1.50-1.60 s on a thread, 1.18-1.39 s in a child (torch
alone 0.83 s, the readahead alone 1.16 s).

The child reports through a pipe, one JSON line a message: first where it wrote the
tokenizer's files, which it does before the chunks (the worker passes that on to its
router, whose prompt encoder parses them, ~0.1 s, while torch still imports here, not
after, when the router's parse held up READY by 30-70 ms on SmolLM2); last, what it did
(``Readahead``: the manifest, the files it checked or wrote). Then it exits. It dies with
the worker (``PR_SET_PDEATHSIG``), so a worker killed mid-start leaves no reader behind.

Example::

    child = ChildReadahead.start(lambda told: source.read_ahead(on_tokenizer_dir=told))
    child.collect_in_background(on_tokenizer_dir=tell_the_router)  # once connected
    import torch                                     # meanwhile
    ahead = child.result()  # what it did, or None
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ember_core import EmberError
from ember_functions.deferred_imports import NUMPY_BLAS_THREADS
from ember_weights_store.libc import libc
from ember_weights_store.verified import Readahead

__all__ = ["ChildReadahead"]

_PR_SET_PDEATHSIG = 1

# What ``check`` is given: call it with the directory the tokenizer's files are in.
TellTokenizerDir = Callable[[Path], None]


class ChildReadahead:
    """``check`` run in a forked child; :meth:`result` waits for it."""

    def __init__(self, pid: int, fd: int) -> None:
        self._pid = pid
        self._fd: int | None = fd
        self._ahead: Readahead | None = None
        self._lock = threading.Lock()  # result() may run on a reaper thread and the loader
        self._on_tokenizer_dir: Callable[[Path], object] | None = None

    @classmethod
    def start(cls, check: Callable[[TellTokenizerDir], Readahead | None]) -> ChildReadahead | None:
        """Forks a child that runs ``check`` and reports what it checked; None if this
        process cannot fork (the loader then checks the chunks itself). ``check`` is
        given a function to call with the tokenizer's directory once its files are
        written. Call it while the process has one thread: a child forked beside others
        may inherit a lock one of them held."""
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            return None
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return None
        if pid == 0:
            os.close(read_fd)
            _run_child(check, write_fd, parent)
        os.close(write_fd)
        return cls(pid, read_fd)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    def result(self) -> Readahead | None:
        """Waits until the child is done; what it did, or None if it did nothing (a model
        loaded from its directory, or it failed: the loader does it all itself)."""
        with self._lock:
            return self._collect()

    def collect_in_background(
        self, *, on_tokenizer_dir: Callable[[Path], object] | None = None
    ) -> None:
        """Reads the child's messages on a daemon thread as they come: ``on_tokenizer_dir``
        hears where the tokenizer is as soon as the child has written it (there, called
        on that thread), and a later :meth:`result` returns what was collected. A worker
        that will not load soon (parked at PROCESS) calls it too: else the finished child
        stays a zombie, or, with a report bigger than the pipe holds, blocks writing it,
        until the worker climbs."""
        self._on_tokenizer_dir = on_tokenizer_dir
        threading.Thread(target=self.result, name="ember-readahead", daemon=True).start()

    def _collect(self) -> Readahead | None:  # under the lock
        if self._fd is None:
            return self._ahead
        pending = b""
        try:
            while piece := os.read(self._fd, 1 << 16):
                *lines, pending = (pending + piece).split(b"\n")
                for line in lines:
                    self._take(line)
        finally:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
        return self._ahead

    def _take(self, line: bytes) -> None:
        """One message from the child; a malformed one is dropped (the loader then does
        that part itself)."""
        with contextlib.suppress(ValueError, TypeError, KeyError, EmberError):
            message = json.loads(line)
            if "tokenizer_dir" in message:
                if self._on_tokenizer_dir is not None:
                    self._on_tokenizer_dir(Path(message["tokenizer_dir"]))
            elif message["readahead"] is not None:
                self._ahead = Readahead.from_dict(message["readahead"])


def _run_child(
    check: Callable[[TellTokenizerDir], Readahead | None], fd: int, parent: int
) -> NoReturn:
    code = 1
    try:
        _die_with_parent()
        # Decoding chunks fetched from an object store imports numpy, whose bundled
        # OpenBLAS would start threads that spin beside the worker's import for nothing:
        # this process does no BLAS (``deferred_imports`` says more).
        os.environ.setdefault(NUMPY_BLAS_THREADS, "1")
        if os.getppid() == parent:  # else the worker died before that took effect
            ahead = check(lambda path: _send(fd, {"tokenizer_dir": str(path)}))
            _send(fd, {"readahead": None if ahead is None else ahead.as_dict()})
            code = 0
    finally:  # whatever happened: never return into the worker's code
        os._exit(code)


def _send(fd: int, message: dict[str, object]) -> None:
    """One message, one line: ``json.dumps`` writes no newline of its own."""
    body = memoryview(json.dumps(message).encode() + b"\n")
    while body:
        body = body[os.write(fd, body) :]


def _die_with_parent() -> None:
    with contextlib.suppress(AttributeError):  # no prctl: not Linux, the child just finishes
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
