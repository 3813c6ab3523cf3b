"""Worker processes: a real ``python -m ember_functions.worker`` per test, spoken to over
its Unix socket by ``WorkerProcess``, the router's handle."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember_core import ContextLengthError, EngineError, InvalidRequestError, WorkerUnavailableError
from ember_functions.engine import Completion, LLMEngine
from ember_functions.loading import StoreConfig
from ember_functions.prompt import Prompt
from ember_functions.rpc import WorkerState
from ember_functions.worker_process import WorkerProcess, socket_path

from ..waiting import wait_for
from .random_prompts import prompt_ids
from .streams import result_within
from .worker_processes import (
    CONFIG,
    GREEDY_16,
    LONG,
    TIMEOUT_S,
    spawn,
    submit,
)

EngineFactory = Callable[..., LLMEngine]


@pytest.fixture
def worker(tiny_model: Callable[..., Path], tmp_path: Path) -> Iterator[WorkerProcess]:
    w = spawn(tiny_model("llama"), tmp_path)
    yield w
    w.close()


def serve_across_packing(worker: WorkerProcess) -> tuple[Completion, Completion]:
    """The same greedy request before the idle worker packs (or gives up packing) and
    after."""
    first = result_within(submit(worker, prompt_ids(7, 20), GREEDY_16, "before"))
    assert worker.wait_packed(timeout_s=TIMEOUT_S)
    return first, result_within(submit(worker, prompt_ids(7, 20), GREEDY_16, "after"))


def test_ready_worker_reports_its_cold_start_and_serves_exactly_what_the_engine_does(
    worker: WorkerProcess, make_engine: EngineFactory
) -> None:
    assert worker.state is WorkerState.READY and worker.alive
    assert worker.model_name == "llama-float32"
    for phase in ("spawn_s", "imports_s", "load_s", "bind_s", "ready_s"):
        assert worker.phases[phase] > 0, phase
    assert worker.phases["ready_s"] >= worker.phases["load_s"] > worker.phases["bind_s"]
    # Spawn ends where the worker's own clock starts: the phases do not overlap (give or
    # take clock reads in two processes; before, spawn counted ~25 ms of imports twice).
    phases = worker.phases
    summed = phases["spawn_s"] + phases["imports_s"] + phases["load_s"]
    assert summed <= phases["ready_s"] + 0.005
    assert "connected_s" not in phases  # the worker's half of that, used up
    assert "first_token_s" not in worker.phases  # the last phase comes with a request
    # It said where its tokenizer is while it loaded: the router's encoder is that parse,
    # made meanwhile, not one made after READY.
    early = worker._prompts.early
    assert early is not None and worker.prompts.tokenizer is early[1].result()

    reference = make_engine("llama", **{"num_threads": 1})
    prompts: list[Prompt] = [
        prompt_ids(1, 20),
        "hello there",
        [{"role": "user", "content": "hi"}],
    ]
    for i, prompt in enumerate(prompts):
        t0 = time.monotonic()
        got = result_within(submit(worker, prompt, GREEDY_16, f"r{i}"))
        wall_s = time.monotonic() - t0
        (want,) = reference.generate([prompt], GREEDY_16)
        assert (got.token_ids, got.text, got.usage) == (want.token_ids, want.text, want.usage)
        assert got.finish_reason == "length"
        if i == 0:
            # The first request's first token is the cold start's last phase: within the
            # request's own time, and only the first request's.
            first_token_s = worker.phases["first_token_s"]
            assert 0 < first_token_s < wall_s
    assert worker.phases["first_token_s"] == first_token_s
    assert worker.describe()["cold_start"]["first_token_s"] == first_token_s


def test_an_idle_worker_packs_its_matrices_and_its_tokens_do_not_change(
    tiny_model: Callable[..., Path], tmp_path: Path, packing_dtype: str
) -> None:
    import torch

    config = dataclasses.replace(CONFIG, dtype=packing_dtype)
    worker = spawn(
        tiny_model("llama", torch.bfloat16), tmp_path, f"t{os.getpid()}-packs", config=config
    )
    try:
        first, again = serve_across_packing(worker)
        assert worker.packed is not None and worker.describe()["pack_s"] == worker.packed.pack_s
        assert worker.packed.pack_s > 0 and worker.packed.stopped is None
        assert again.token_ids == first.token_ids
    finally:
        worker.close()


def test_a_worker_stops_packing_where_host_ram_would_run_short_and_still_serves(
    tiny_model: Callable[..., Path], tmp_path: Path, packing_dtype: str
) -> None:
    import torch

    # More free RAM than any machine has: not one layer may be packed.
    config = dataclasses.replace(CONFIG, dtype=packing_dtype, pack_min_free_bytes=1 << 60)
    worker = spawn(
        tiny_model("llama", torch.bfloat16), tmp_path, f"t{os.getpid()}-no-ram", config=config
    )
    try:
        first, again = serve_across_packing(worker)
        assert worker.packed is not None and worker.packed.pack_s == 0.0
        stopped = worker.packed.stopped
        assert stopped is not None and "pack_min_free_bytes" in stopped
        assert worker.describe()["pack_stopped"] == stopped
        assert again.token_ids == first.token_ids
    finally:
        worker.close()


def test_concurrent_streams_batch_and_give_every_kv_block_back(worker: WorkerProcess) -> None:
    start_blocks = worker.free_kv_blocks

    async def run_all() -> list[list[str]]:
        async def one(i: int) -> list[str]:
            stream = submit(worker, prompt_ids(i, 10 + i), GREEDY_16, f"c{i}")
            return [out.text async for out in stream]

        return await asyncio.gather(*(one(i) for i in range(12)))

    texts = asyncio.run(run_all())
    assert len(texts) == 12 and all(texts)
    assert worker.queue_depth == 0 and worker.state is WorkerState.READY
    assert worker.free_kv_blocks == start_blocks


def test_cancel_mid_stream_ends_the_request_with_its_usage(worker: WorkerProcess) -> None:
    start_blocks = worker.free_kv_blocks
    stream = submit(worker, prompt_ids(3, 12), LONG, "cancel-me")
    outputs = iter(stream)
    for _ in range(3):
        next(outputs)
    stream.cancel()
    rest = list(outputs)
    final = rest[-1]
    assert final.finished and final.finish_reason == "cancelled"
    assert 3 <= final.usage.completion_tokens < LONG.max_tokens  # type: ignore[operator]
    wait_for(lambda: worker.free_kv_blocks == start_blocks, "the worker freed the blocks")


def test_bad_requests_are_refused_before_they_reach_the_worker(worker: WorkerProcess) -> None:
    with pytest.raises(ContextLengthError, match="context window"):
        worker.prepare(prompt_ids(4, 5000), GREEDY_16, request_id="too-long")
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        worker.prepare([10**6], GREEDY_16, request_id="bad-token")
    stream = submit(worker, prompt_ids(5, 8), LONG, "dup")
    with pytest.raises(InvalidRequestError, match="already running"):
        submit(worker, prompt_ids(5, 8), GREEDY_16, "dup")
    stream.cancel()
    result_within(stream)
    assert result_within(submit(worker, "still serving", GREEDY_16, "after")).token_ids


def test_kill_9_mid_stream_fails_open_requests_with_a_retryable_error(
    worker: WorkerProcess,
) -> None:
    streams = [submit(worker, prompt_ids(i, 10), LONG, f"k{i}") for i in range(3)]
    first = iter(streams[0])
    next(first)  # it is generating
    os.kill(worker.proc.pid, signal.SIGKILL)
    for stream in streams:
        with pytest.raises(EngineError, match=r"exited with code -9.*retrying it is safe"):
            result_within(stream)
    # What each request produced before the crash is its usage (what gets billed).
    assert streams[0].outputs[-1].usage.completion_tokens >= 1
    wait_for(lambda: worker.state is WorkerState.FAILED, "the worker is FAILED")
    assert not worker.alive and "exited with code -9" in (worker.failure or "")
    with pytest.raises(WorkerUnavailableError, match=r"failed.*retrying on another worker"):
        worker.prepare("hi", GREEDY_16, request_id="after-death")


def test_a_worker_that_cannot_load_fails_with_the_reason(
    copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = copy_model("llama")
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 24  # no longer matches the weights
    (model / "config.json").write_text(json.dumps(config))
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"failed to load its model: ") as err:
        spawn(model, tmp_path, "corrupt")
    assert time.monotonic() - t0 < TIMEOUT_S
    assert "hidden" in str(err.value) or "shape" in str(err.value)
    assert not socket_path("corrupt").exists()


def test_a_worker_that_hangs_while_loading_is_killed_once_silent_not_at_the_load_timeout(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A loading worker sends a heartbeat every second; one that stops (here SIGSTOP, as a
    deadlock would) is killed after load_silence_s, long before load_timeout_s."""
    from ember_functions.launch import SubprocessLauncher

    worker_id = f"t{os.getpid()}-hangs"
    launched: list[object] = []

    class StopOnceConnected(SubprocessLauncher):
        def launch(self, worker_args: list[str]) -> object:  # type: ignore[override]
            proc = super().launch(worker_args)
            launched.append(proc)

            def stop() -> None:  # once the router took the connection (and unlinked its name)
                deadline = time.monotonic() + TIMEOUT_S
                while socket_path(worker_id).exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGSTOP)

            threading.Thread(target=stop, daemon=True).start()
            return proc

    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"sent nothing for \d+ s while loading \(hung\)"):
        WorkerProcess.spawn(
            worker_id=worker_id,
            model=str(tiny_model("llama")),
            home=tmp_path,
            engine_config=CONFIG,
            launcher=StopOnceConnected(),
            load_timeout_s=TIMEOUT_S,
            load_silence_s=2.0,
        )
    assert time.monotonic() - t0 < 10  # not the minute load_timeout_s allows
    (proc,) = launched
    assert proc.wait(timeout=10) == -signal.SIGKILL  # type: ignore[attr-defined]


def test_close_ends_running_requests_as_cancelled_and_removes_the_socket(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    worker = spawn(tiny_model("llama"), tmp_path, "closing")
    assert not socket_path("closing").exists()  # connected: the name is gone already
    stream = submit(worker, prompt_ids(6, 10), LONG, "running")
    next(iter(stream))
    worker.close()
    final = result_within(stream)
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens >= 1
    assert worker.state is WorkerState.STOPPED and worker.proc.returncode == 0


# -- the zygote -------------------------------------------------------------------------


# -- where weights come from ----------------------------------------------------------


def test_a_worker_loads_from_s3_into_an_empty_home_and_from_host_ram_next(
    s3_endpoint: str, tiny_model: Callable[..., Path], tmp_path: Path, worker: WorkerProcess
) -> None:
    import boto3

    from ember_weights_store import ModelCatalog
    from ember_weights_store.s3_tier import S3Tier

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    origin = S3Tier(bucket="models", prefix="ember", endpoint_url=s3_endpoint)
    ModelCatalog(tmp_path / "publisher").store(origin=origin).import_hf_dir(
        tiny_model("llama"), model_id="tiny"
    )
    home = tmp_path / "fresh"  # nothing installed, nothing cached
    store = StoreConfig(
        origin="s3://models/ember",
        endpoint_url=s3_endpoint,
        disk_cache_bytes=0,
        host_cache_bytes=64 << 20,
    )
    prompt = prompt_ids(11, 12)
    want = result_within(submit(worker, prompt, GREEDY_16, "ref")).token_ids
    tiers = []
    try:
        for i in range(2):  # first from S3, then from the host tier it filled
            w = WorkerProcess.spawn(
                worker_id=f"s3-{os.getpid()}-{i}",
                model="tiny",
                home=home,
                engine_config=CONFIG,
                store=store,
            )
            try:
                assert result_within(submit(w, prompt, GREEDY_16, f"s{i}")).token_ids == want
                tiers.append(w.chunks_by_tier)
                # Fetched and decoded by the readahead child while torch imported: the
                # loader only mapped the host tier's files, checked already.
                assert w.phases["decompress_s"] == 0.0 and w.phases["verify_s"] == 0.0
                # From the store, the tokenizer's directory is named by its content and
                # announced once its files are written; the router parsed it meanwhile.
                early = w._prompts.early
                assert early is not None and w.prompts.tokenizer is early[1].result()
                assert early[0].startswith(str(home / "tokenizers"))
            finally:
                w.close()
        assert not (home / "models").exists()  # loaded straight from the store
        # The first worker's readahead child fetched the chunks from S3 into the host tier
        # while torch imported; the second found them there.
        assert list(tiers[0]) == ["s3"] and list(tiers[1]) == ["host"], tiers
    finally:
        shutil.rmtree(ModelCatalog(home).host_cache_root, ignore_errors=True)
