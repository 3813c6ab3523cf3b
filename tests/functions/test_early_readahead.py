"""A new worker's readahead runs in a forked child: what it did (the manifest it read, the
files it checked) comes back through a pipe, a failed one comes back as nothing (the
loader does it all itself), and the child dies with the worker. (A real worker's use:
test_worker_readahead.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ember_functions.early_readahead import ChildReadahead
from ember_weights_store import LocalBucketTier, WeightsStore
from ember_weights_store.manifest import Manifest
from ember_weights_store.verified import FileIdentity, Readahead


def test_what_the_child_did_comes_back_and_it_ran_in_another_process(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = WeightsStore([LocalBucketTier(tmp_path / "bucket")])
    store.import_hf_dir(tiny_model("llama"), model_id="acme/tiny")
    manifest = store.manifest("acme/tiny")

    def read_in_child(told: Callable[[Path], None]) -> Readahead:
        ahead = Readahead(manifest=manifest, bytes_read=7, fetched_bytes=5)
        ahead.verified.add(f"ran-in-{os.getpid()}", FileIdentity(1, 2, 3, 4))
        return ahead

    child = ChildReadahead.start(read_in_child)
    assert child is not None
    ahead = child.result()
    assert ahead is not None and len(ahead.verified) == 1
    (key,) = ahead.verified.as_dict()
    assert key.startswith("ran-in-") and key != f"ran-in-{os.getpid()}"
    assert ahead.verified.as_dict()[key] == [[1, 2, 3, 4]]
    assert isinstance(ahead.manifest, Manifest) and ahead.manifest == manifest
    assert (ahead.bytes_read, ahead.fetched_bytes) == (7, 5)
    assert child.result() is ahead  # waited for once


def test_the_child_starts_no_blas_threads_and_the_worker_keeps_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # numpy, imported in the child to decode fetched chunks, would start OpenBLAS threads
    # that spin beside the worker's import; the setting is the child's alone.
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)

    def check(told: Callable[[Path], None]) -> Readahead:
        told(Path(os.environ.get("OPENBLAS_NUM_THREADS", "unset")))
        return Readahead()

    child = ChildReadahead.start(check)
    assert child is not None
    heard: list[Path] = []
    child.collect_in_background(on_tokenizer_dir=heard.append)
    assert child.result() is not None
    assert heard == [Path("1")] and "OPENBLAS_NUM_THREADS" not in os.environ


def test_the_tokenizer_dir_is_heard_while_the_child_still_reads(tmp_path: Path) -> None:
    # The child tells where the tokenizer is, then goes on; the worker hears it at once
    # (its router parses the tokenizer meanwhile), well before the child is done.
    go_on = tmp_path / "go-on"

    def check(told: Callable[[Path], None]) -> Readahead | None:
        told(tmp_path / "tok")
        deadline = time.monotonic() + 30
        while not go_on.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return Readahead(bytes_read=3)

    child = ChildReadahead.start(check)
    assert child is not None
    heard: list[tuple[Path, bool]] = []
    child.collect_in_background(on_tokenizer_dir=lambda path: heard.append((path, go_on.exists())))
    deadline = time.monotonic() + 10
    while not heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [(tmp_path / "tok", False)]  # the child is still at its reads
    go_on.touch()
    ahead = child.result()
    assert ahead is not None and ahead.bytes_read == 3
    assert heard == [(tmp_path / "tok", False)]


def test_a_readahead_that_fails_or_finds_nothing_gives_none() -> None:
    def fails(told: Callable[[Path], None]) -> Readahead:
        raise OSError("disk gone")

    for check in (fails, lambda told: None):
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
        ahead = ChildReadahead.start(lambda told: time.sleep(60))
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


def test_a_worker_imports_neither_torch_nor_numpy_before_it_connects() -> None:
    """Everything ``ember_functions.worker`` imports before ``main`` connects to the router
    (the readahead child's handover among it): a heavy import there delays LOADING and
    the fork of the readahead child (the manifest module's numpy once cost 0.15 s)."""
    code = (
        "import sys, ember_functions.worker\nprint(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_worker_imports_none_of_its_on_demand_libraries_on_its_way_to_ready() -> None:
    # Each is imported where it is first used: chat templates (jinja2), a parse
    # (tokenizers), a compressed chunk (zstandard), a checksum (xxhash). A worker decoding
    # from a table, given ids, its chunks checked by its readahead child, uses none of them.
    on_demand = ("jinja2", "tokenizers", "zstandard", "xxhash")
    code = (
        "import sys; from ember_functions.worker import preload; preload(); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {on_demand!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
