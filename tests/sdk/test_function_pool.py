"""``@llm.function(pool=...)`` on the embedded backend: real worker processes forked from a
real zygote, on a tiny random model. The pooled path gives the in-process path's text,
streams, maps and runs async; ``min_warm=0`` scales to zero; policies get their own pools;
bad pool options fail at decoration; closing (or exiting) leaves no process behind; over
HTTP a declared pool is ignored with one warning."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ember import llm
from ember._backends import EmbeddedBackend, HTTPBackend
from ember_core import ConfigError, ModelNotFoundError, RateLimitError

from ..waiting import wait_for

TIMEOUT_S = 30.0
# Short keepalive: idle workers of a min_warm=0 pool stop within a second.
SCALE_TO_ZERO = {"min_warm": 0, "buffer": 0, "max_workers": 2, "keepalive_s": 0.3}


def engine_config() -> object:
    from ember_functions.engine_config import EngineConfig

    return EngineConfig(num_threads=1, kv_cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBackend]:
    """One embedded backend (one zygote) for the module's pooled functions."""
    embedded = EmbeddedBackend(str(tmp_path_factory.mktemp("home")), engine_config=engine_config())
    llm.use_backend(embedded)
    yield embedded
    llm.use_backend(None)
    embedded.close()


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> str:
    return str(tiny_model("llama"))


def live_workers(backend: EmbeddedBackend, policy: llm.Pool, model: str) -> list[object]:
    pool = backend.pools()[(model, policy)]
    return [r for r in pool.status() if r["state"] in ("STARTING", "LOADING", "READY", "BUSY")]


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pooled_function_matches_in_process_streams_maps_and_runs_async(
    backend: EmbeddedBackend, model: str
) -> None:
    @llm.function(model=model, max_tokens=16, temperature=0)
    def story(topic: str) -> str:
        return f"Write a story about {topic}."

    pooled = story.with_options(pool=llm.Pool(max_workers=2, keepalive_s=60))
    topics = ["a cat", "a dog", "the sea"]
    expected = [story(t) for t in topics]  # the in-process engine, greedy
    assert backend.pools() == {}  # no pool until a pooled function is called

    assert pooled("a cat") == expected[0] and expected[0]
    assert list(backend.pools()) == [(model, pooled.options.pool)]
    deltas = list(pooled.stream("a cat"))
    assert len(deltas) >= 3 and "".join(deltas) == expected[0]  # streamed, not one chunk
    assert pooled.map(topics) == expected
    assert pooled.spawn("a dog").result(timeout_s=TIMEOUT_S) == expected[1]

    async def run_async() -> tuple[str, str, list[str]]:
        one = await pooled.acall("a cat")
        streamed = "".join([d async for d in pooled.astream("a dog")])
        return one, streamed, await pooled.amap(topics)

    assert asyncio.run(run_async()) == (expected[0], expected[1], expected)
    # A stream abandoned after its first delta frees its slot: the next calls still run.
    it = pooled.stream("a cat")
    assert next(it) == deltas[0]
    it.close()
    assert pooled("a cat") == expected[0]


def test_min_warm_zero_scales_to_zero_and_each_policy_gets_its_own_pool(
    backend: EmbeddedBackend, model: str
) -> None:
    @llm.function(model=model, max_tokens=8, pool=SCALE_TO_ZERO)
    def first(x: str) -> str:
        return x

    @llm.function(model=model, max_tokens=4, pool=llm.Pool(**SCALE_TO_ZERO))
    def same_policy(x: str) -> str:
        return x

    other = first.with_options(pool={"max_workers": 1, "keepalive_s": 60})
    policy = first.options.pool
    assert policy is not None and policy == same_policy.options.pool

    first("hello")
    same_policy("hello")
    other("hello")
    pools = backend.pools()
    assert (model, policy) in pools and (model, other.options.pool) in pools
    assert pools[(model, policy)] is not pools[(model, other.options.pool)]
    assert len([key for key in pools if key[1] == policy]) == 1  # one pool, shared
    # Idle past keepalive_s: min_warm=0 stops every worker.
    wait_for(lambda: live_workers(backend, policy, model) == [], "the pool scaled to zero")
    pool = pools[(model, policy)]
    starts = len(pool.cold_starts)
    assert first("again") == first("again")  # a call after zero starts a worker again
    assert len(pool.cold_starts) > starts
    assert live_workers(backend, other.options.pool, model)  # the other pool kept its own


def test_pool_errors_are_ember_errors(backend: EmbeddedBackend, model: str) -> None:
    @llm.function(model=model, max_tokens=4, pool={"max_workers": 1, "buffer": 0})
    def f(x: str) -> str:
        return x

    f("warm")
    pool = backend.pools()[(model, f.options.pool)]
    pool.max_queue = 0  # the pool's queue for workers is full: 429 at once, nothing runs
    try:
        with pytest.raises(RateLimitError, match="already wait"):
            f("x")
        with pytest.raises(RateLimitError):
            asyncio.run(f.acall("x"))
    finally:
        pool.max_queue = 64
    assert isinstance(f("x"), str)


def test_invalid_pool_options_fail_at_decoration_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"unknown pool setting\(s\) min_warmm"):
        llm.function(pool={"min_warmm": 1})
    with pytest.raises(ConfigError, match=r"min_warm=3 exceeds max_workers=2.*raise max_workers"):
        llm.function(pool={"min_warm": 3, "max_workers": 2})
    with pytest.raises(ConfigError, match="keepalive_s must be finite and >= 0"):
        llm.function(pool={"keepalive_s": -1})
    with pytest.raises(ConfigError, match=r"pool must be an llm.Pool.*got int 3.*llm.Pool\("):
        llm.function(pool=3)  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="max_workers must be an integer >= 1"):
        llm.Pool(max_workers=0)

    @llm.function(pool={"reserve_warmth": "host"})
    def ok() -> str:
        return "x"

    assert ok.options.pool == llm.Pool(reserve_warmth=llm.Pool().reserve_warmth.HOST)
    with pytest.raises(ConfigError, match="buffer must be an integer"):
        ok.with_options(pool={"buffer": "1"})
    assert ok.with_options(pool=None).options.pool is None


def test_unknown_model_is_the_usual_error(backend: EmbeddedBackend, tmp_path: Path) -> None:
    @llm.function(model=str(tmp_path / "no-such-model"), pool={"max_workers": 1})
    def missing() -> str:
        return "x"

    with pytest.raises(ModelNotFoundError):
        missing()


def test_close_stops_workers_and_zygote(
    model: str, tmp_path: Path, child_states: Callable[[int], dict[int, str]]
) -> None:
    def children(pid: int) -> set[int]:  # live ones: a zombie has exited
        return {child for child, state in child_states(pid).items() if state != "Z"}

    before = children(os.getpid())
    embedded = EmbeddedBackend(str(tmp_path / "home"), engine_config=engine_config())
    llm.use_backend(embedded)
    try:
        pool_options = {"min_warm": 1, "max_workers": 2, "predictive": True}

        @llm.function(model=model, max_tokens=4, pool=pool_options)
        def hello(x: str) -> str:
            return x

        assert hello.map(["a", "b"]) == [hello("a"), hello("b")]
        ((_, pool),) = embedded.pools().items()
        workers = [int(str(r["pid"])) for r in pool.status() if r["pid"] is not None]
        zygote = embedded._pools.zygote if embedded._pools else None
        assert workers and zygote is not None
        assert all(pid_alive(pid) for pid in [*workers, zygote.proc.pid])
    finally:
        llm.use_backend(None)
        embedded.close()
    wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers exited", timeout_s=10)
    assert not pid_alive(zygote.proc.pid)
    assert children(os.getpid()) <= before
    assert embedded.pools() == {}
    # The predictive pool kept what it learned for the program's next run.
    (saved,) = (tmp_path / "home" / "pools").glob("sdk-*.forecast.json")
    assert json.loads(saved.read_text())["state"]


def test_interpreter_exit_stops_workers_and_zygote(model: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from ember import llm
        from ember._backends import EmbeddedBackend
        from ember_functions.engine_config import EngineConfig

        backend = EmbeddedBackend({str(tmp_path / "home")!r},
                                  engine_config=EngineConfig(num_threads=1))
        llm.use_backend(backend)

        @llm.function(model={model!r}, max_tokens=4, pool={{"min_warm": 1}})
        def hello(x: str) -> str:
            return x

        hello("a")
        ((_, pool),) = backend.pools().items()
        # A buffer worker the call started may still be starting (no pid yet): its
        # process ends with the router's socket like the rest.
        pids = [r["pid"] for r in pool.status() if r["pid"]] + [backend._pools.zygote.proc.pid]
        print("PIDS", *pids, flush=True)
        """  # exits without close(): atexit closes the pools and the zygote
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("PIDS")]
    pids = [int(p) for p in line.split()[1:]]
    wait_for(lambda: not any(pid_alive(p) for p in pids), "the processes exited", timeout_s=10)


def test_http_ignores_a_declared_pool_with_one_warning_per_function() -> None:
    http = HTTPBackend("http://127.0.0.1:1", "ek_abcdefgh_secret", timeout_s=2)
    llm.use_backend(http)
    try:

        @llm.function(model="tiny", pool={"max_workers": 2})
        def pooled() -> str:
            return "hi"

        @llm.function(model="tiny")
        def plain() -> str:
            return "hi"

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for call in (pooled, pooled, plain):
                with pytest.raises(httpx.ConnectError):  # nothing listens: the call was made
                    call()
        (warning,) = caught
        assert issubclass(warning.category, UserWarning)
        assert warning.filename == __file__  # it points at the caller's line
        message = str(warning.message)
        assert "pooled(): pool= is ignored over HTTP" in message and "pool_min_warm" in message
    finally:
        llm.use_backend(None)
