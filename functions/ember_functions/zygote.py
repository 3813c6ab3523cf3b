"""The zygote: a fork server that has already imported torch and Ember, so starting a
worker costs a ``fork()``, not an interpreter start and its imports.

    python -m ember_functions.zygote --zygote-id ID --socket PATH

It connects to its router's socket (like a worker) and serves one connection, strictly
one request at a time, over the frames of ``ember_functions.rpc``::

    router -> zygote: {"op": "fork", "args": [worker flags...]}
                      {"op": "prepare", "tokenizer_dir", "weights"}
    zygote -> router: {"op": "forked", "pid"}  the reply to a fork
                      {"op": "prepared", "error"}  the reply to a prepare (error: null or why)
                      {"op": "ready"}          once, after the imports
                      {"op": "exited", "pid", "code"}   whenever a child ends (code < 0: signal)

``prepare`` parses a model's tokenizer here, once, so that every later child inherits it
parsed: without it each worker spends ~0.15 s of its start in ``Tokenizer.from_dir``
(a 49k-token vocabulary), more than the rest of its binding. A pool sends it when its
first worker reports where the tokenizer is. With ``weights`` (``{"home", "model",
"store"}``, as a worker's flags give them) it also checks the model's chunks held on this
machine against their checksums, once (``WeightsSource.read_ahead``, on a thread at the
lowest CPU priority, which the next fork waits for): a child then maps them without
hashing them again (~20 ms of a SmolLM2 fork's start), for as long as each file is the
one checked (``ember_weights_store.verified``), and loads with the manifest the zygote
read then, instead of reading it again: from an S3 origin that read (a client and a GET)
was half of a prewarmed SmolLM2 start, 0.27 s -> 0.12 s. So every worker a prepared
zygote forks loads the same manifest, even if the model is imported again under the same
revision meanwhile: a pool does not mix two versions of its model; a new pool picks the
new one up.

The zygote never runs a torch operation, so it has no OpenMP pool or CUDA context for a
child to inherit half-initialised; it forks single-threaded (a select loop, SIGCHLD through
a wakeup pipe; a weights check's thread is joined first) because ``fork()`` copies only
the calling thread. The router's connection
closing ends the zygote; its children live on until their own router connections close.
Like its workers, it ignores SIGINT and SIGTERM: those reach the router's whole process
group at once (Ctrl-C, ``systemctl stop``), and the router stops both in order.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import gc  # noqa: E402

# As Python's docs advise for fork servers: no cyclic GC while importing, everything
# frozen right before each fork() (see ``_fork``), collection back on in the child once it
# has loaded. A collection writes to every object it walks, so a child collecting
# objects it inherited would copy the zygote's heap page by page, each copy a page fault
# (and, with an OpenMP thread on the other core, a TLB shootdown).
if __name__ == "__main__":
    gc.disable()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from ember_functions.host_memory import release_free_heap  # noqa: E402
from ember_functions.rpc import FrameReader, FrameWriter  # noqa: E402
from ember_weights_store.verified import VerifiedCopies  # noqa: E402

if TYPE_CHECKING:
    from ember_functions.loading import WeightsSource
    from ember_functions.tokenizer import Tokenizer
    from ember_weights_store.manifest import Manifest

__all__ = ["main"]


@dataclass
class _Prepared:
    """What the zygote readied for its children: parsed tokenizers, checked chunks and
    the manifests read with them."""

    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)  # directory -> parsed
    verified: VerifiedCopies = field(default_factory=VerifiedCopies)
    manifests: dict[WeightsSource, Manifest] = field(default_factory=dict)
    checking: threading.Thread | None = None  # a weights check still running

    def settle(self) -> None:
        """Waits for a weights check in flight: ``fork()`` copies only the calling
        thread, so the zygote forks with no other thread running."""
        if self.checking is not None:
            self.checking.join()
            self.checking = None

    def check_in_background(self, source: WeightsSource) -> None:
        """Checks ``source``'s local chunks on a thread at the lowest CPU priority: a
        pool prepares the zygote as its first worker turns READY, usually with a request
        on its way to that worker, which the check (~25 ms of a core for SmolLM2) must
        not slow down. The next fork waits for it (``settle``)."""

        def run() -> None:
            # On Linux a nice value belongs to one thread: the zygote's own stays as it
            # is, and so does every child's.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            try:
                ahead = source.read_ahead()
            except Exception as exc:  # the children check their chunks themselves
                print(f"zygote: could not check {source.model}'s chunks: {exc}", file=sys.stderr)
                return
            if ahead is not None:
                self.verified.update(ahead.verified)
                if ahead.manifest is not None:
                    self.manifests[source] = ahead.manifest

        self.settle()
        self.checking = threading.Thread(target=run, name="ember-zygote-check", daemon=True)
        self.checking.start()


def _fork(
    args: list[str],
    control: socket.socket,
    wake_fds: tuple[int, int],
    prepared: _Prepared,
) -> int:
    started_s = time.perf_counter()
    prepared.settle()
    gc.freeze()  # O(1): moves every tracked object to the permanent generation
    # ~0.05 ms. A child's mallocs reuse free chunks it inherited: a page still mapped in
    # the zygote is copied on that first write (a fault and, once the child runs its OpenMP
    # thread, a TLB shootdown), where a page given back faults in as a fresh zero page.
    # Parsing tokenizers and checking weights leave plenty of such pages. Measured on the
    # 2-core AMX Xeon: a prewarmed SmolLM2 start 0.128-0.135 s -> 0.102-0.108 s (bind
    # 36 -> 24 ms, first token 78 -> 64 ms; ``bench/coldstart.py --states prewarmed``).
    release_free_heap()
    pid = os.fork()
    if pid:
        return pid
    # The child: shed the zygote's plumbing, then become a worker.
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake_fds:
            os.close(fd)
        control.close()
        from ember_functions import worker

        code = worker.main(
            args,
            started_s=started_s,
            tokenizers=prepared.tokenizers,
            verified=prepared.verified,
            manifests=prepared.manifests,
        )
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(writer: FrameWriter) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        writer.try_send({"op": "exited", "pid": pid, "code": code})


def _prepare(message: dict[str, Any], prepared: _Prepared) -> str | None:
    """Parses the tokenizer in the message's ``tokenizer_dir`` and checks its ``weights``'
    local chunks, for the children to come; the error, if any, for the router (the
    children then do it themselves, and fail there if so)."""
    from ember_functions.loading import WeightsSource
    from ember_functions.tokenizer import Tokenizer

    tokenizer_dir = str(message["tokenizer_dir"])
    try:
        if tokenizer_dir not in prepared.tokenizers:
            prepared.tokenizers[tokenizer_dir] = Tokenizer.from_dir(Path(tokenizer_dir))
        weights = message.get("weights")
        if weights:
            source = WeightsSource.from_dict(weights)
            if not source.store.origin:  # else the model is the origin's, not installed here
                source.store.catalog(source.home).resolve(source.model)  # a bad name fails here
            prepared.check_in_background(source)
    except Exception as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
    return None


def serve(control: socket.socket) -> None:
    reader, writer = FrameReader(control), FrameWriter(control)
    prepared = _Prepared()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    # A handler must be installed for the wakeup fd to be written; the work is in the loop.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    writer.send({"op": "ready", "pid": os.getpid(), "imports_s": time.perf_counter() - _T0})
    while True:
        readable, _, _ = select.select([control.fileno(), wake_r], [], [])
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(writer)
        if control.fileno() in readable:
            # One request at a time, so no second frame can sit in the reader's buffer
            # unseen by select.
            message = reader.read()
            if message is None:
                return
            if message["op"] == "fork":
                pid = _fork(list(message["args"]), control, (wake_r, wake_w), prepared)
                writer.send({"op": "forked", "pid": pid})
            elif message["op"] == "prepare":
                error = _prepare(message, prepared)
                writer.send({"op": "prepared", "error": error})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ember_functions.zygote")
    ap.add_argument("--zygote-id", required=True)
    ap.add_argument("--socket", required=True)
    args = ap.parse_args(argv)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(args.socket)
    from ember_functions.worker import gc_settled, leave_stop_signals_to_the_router, preload

    leave_stop_signals_to_the_router()  # its children inherit it
    preload()
    gc_settled()  # the imports stay out of the collector's reach; what serving makes does not
    serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
