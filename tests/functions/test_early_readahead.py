"""A new worker's readahead runs in a forked child: what it checked comes back through a
pipe, a failed check comes back as nothing (the loader checks for itself), and the child
dies with the worker. (A real worker's use: test_worker_readahead.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ember_functions.early_readahead import ChildReadahead
from ember_weights_store.verified import FileIdentity, VerifiedCopies


def checked_in_child() -> VerifiedCopies:
    copies = VerifiedCopies()
    copies.add(f"ran-in-{os.getpid()}", FileIdentity(1, 2, 3, 4))
    return copies


def test_what_the_child_checked_comes_back_and_it_ran_in_another_process() -> None:
    ahead = ChildReadahead.start(checked_in_child)
    assert ahead is not None
    verified = ahead.result()
    assert verified is not None and len(verified) == 1
    (key,) = verified.as_dict()
    assert key.startswith("ran-in-") and key != f"ran-in-{os.getpid()}"
    assert verified.as_dict()[key] == [1, 2, 3, 4]
    assert ahead.result() is verified  # waited for once


def test_a_check_that_fails_or_finds_nothing_gives_none() -> None:
    def fails() -> VerifiedCopies:
        raise OSError("disk gone")

    for check in (fails, lambda: None):
        ahead = ChildReadahead.start(check)
        assert ahead is not None and ahead.result() is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_the_child_dies_with_its_worker() -> None:
    worker = textwrap.dedent(
        """
        import sys, time
        from ember_functions.early_readahead import ChildReadahead
        ahead = ChildReadahead.start(lambda: time.sleep(60))
        print(ahead.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert _alive(child)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, f"readahead child {child} outlived its worker"
        time.sleep(0.05)
