"""ModelPool and PoolRouter with real worker processes (forked from a real zygote) on a tiny
model: scaling up under load and back to zero, placement and its queue, a host reserve
parked and promoted, draining, and several workers sharing one copy of the model.
``test_worker_failures.py`` has the workers that die, hang or cannot load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ember_core import RateLimitError
from ember_functions.launch import Zygote
from ember_functions.packed_cache import sharing_works
from ember_functions.sequence import RequestOutput
from ember_functions.worker_process import WorkerProcess
from ember_platform.pool_router import PoolRouter
from ember_warmpool import PoolPolicy, Warmth
from ember_warmpool.host_sharing import auto_host_sharing
from ember_warmpool.manager import ModelPool
from ember_weights_store import DiskTier, ModelCatalog
from ember_weights_store.host_tier import HostTier

from ..waiting import wait_for
from .pools import LONG, ONE_SEQ, SHORT, collect, live


def test_scales_up_under_load_and_back_to_zero_when_idle(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=0, buffer=0, max_workers=3, keepalive_s=2.0))
    pool.start()
    router = PoolRouter({"m": pool})
    assert len(live(pool)) == 1  # the boot worker

    async def burst() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(router, "m", f"b{i}", LONG) for i in range(3)))

    results = asyncio.run(burst())
    assert all(r[-1].finish_reason == "length" for r in results)
    assert len(pool.cold_starts) == 3  # one worker per concurrent request, no more
    # Two of the three waited for the workers their arrival started.
    assert pool.stats()["requests"] == 3 and pool.stats()["cold_requests"] == 2
    # Idle past keepalive: every worker stops, min_warm=0 scales to zero.
    wait_for(lambda: live(pool) == [], "the pool scaled to zero")
    stopped = pool.stats()
    time.sleep(0.3)
    assert pool.stats()["worker_s"] == stopped["worker_s"]  # nothing runs, nothing accrues
    assert stopped["starts"] == 3 and stopped["worker_s"] > 3 * 2.0  # each idled keepalive_s
    # And a new request brings one back (a cold start, from the zygote).
    again = asyncio.run(collect(router, "m", "after", SHORT))
    assert again[-1].usage.completion_tokens == 4 and len(pool.cold_starts) == 4
    assert pool.stats()["cold_requests"] == 3


def test_later_workers_start_on_the_first_workers_parsed_tokenizer(
    make_pool: Callable[..., ModelPool], tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    pool = make_pool(PoolPolicy(min_warm=0, buffer=0, max_workers=3, keepalive_s=30.0), model=model)
    pool.start()
    # From here only the zygote's parsed copy (and the router's encoder) can serve.
    (model / "tokenizer.json").rename(model / "tokenizer.json.hidden")
    router = PoolRouter({"m": pool})

    async def burst() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(router, "m", f"t{i}", LONG) for i in range(3)))

    results = asyncio.run(burst())
    assert all(r[-1].finish_reason == "length" for r in results)
    assert len(pool.cold_starts) == 3


def test_a_full_queue_is_refused_at_once_with_retry_after(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=1, buffer=0, max_workers=1, keepalive_s=60))
    pool.max_queue = 1
    pool.start()
    router = PoolRouter({"m": pool}, queue_timeout_s=30)

    async def go() -> None:
        running = asyncio.ensure_future(collect(router, "m", "running", LONG))
        waiting = asyncio.ensure_future(collect(router, "m", "waiting", SHORT))
        while pool.queued < 1:  # the only worker runs one sequence: the second one waits
            await asyncio.sleep(0.01)
        prepared = router.prepare("m", [1, 2], SHORT, request_id="third", tenant="t")
        with pytest.raises(RateLimitError, match="already wait") as refused:
            router.start(prepared)
        assert refused.value.retry_after_s >= 1
        assert (await running)[-1].usage.completion_tokens == 300
        assert (await waiting)[-1].usage.completion_tokens == 4  # it ran once a slot freed

    asyncio.run(go())


def test_a_worker_being_placed_on_is_not_stopped_under_it(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=0, buffer=0, max_workers=1, keepalive_s=0.2))
    pool.start()  # its tick thread runs too: the race is real, not staged
    with pool.placing() as worker:
        assert worker is not None
        time.sleep(0.6)  # idle past keepalive: the policy wants it gone
        assert worker.alive and [r["state"] for r in live(pool)] == ["READY"]
        stream = worker.submit_prepared(worker.prepare([1, 2, 3], SHORT, request_id="late"))
    # The request it was chosen for runs to the end on it, then the worker may go.
    (*_, last) = stream
    assert last.finish_reason == "length" and last.usage.completion_tokens == 4
    wait_for(lambda: live(pool) == [], "the idle worker stopped after the request")


def test_a_request_overflowing_onto_a_busy_worker_starts_the_next_one_at_once(
    make_pool: Callable[..., ModelPool],
) -> None:
    # Room for two sequences, sized for one: the second request shares the busy worker
    # (overflow beats waiting for a start) and is what tells the policy to start another.
    two_seqs = dataclasses.replace(ONE_SEQ, max_num_seqs=2)
    policy = PoolPolicy(min_warm=0, buffer=0, max_workers=2, keepalive_s=30.0)
    pool = make_pool(policy, engine_config=two_seqs, tick_s=60.0)  # no tick within the test
    pool.start()
    router = PoolRouter({"m": pool})
    time.sleep(0.2)  # the tick thread's first wait has begun: only a wake-up can start one

    async def two() -> list[list[RequestOutput]]:
        streaming = asyncio.Event()

        async def long() -> list[RequestOutput]:
            prepared = router.prepare("m", [1, 2, 3, 4, 5], LONG, request_id="first", tenant="t")
            outs = []
            async for out in router.start(prepared):
                outs.append(out)
                streaming.set()
            return outs

        first = asyncio.create_task(long())
        # Sent once the first streams, so it certainly overflows onto a busy worker: a
        # fixed sleep raced the first's 300 tokens on a fast CPU (it had finished, and the
        # second found the worker idle).
        await streaming.wait()
        second = await collect(router, "m", "second", SHORT)
        return [await first, second]

    first, second = asyncio.run(two())
    assert first[-1].finish_reason == "length" and second[-1].usage.completion_tokens == 4
    # Both ran on the boot worker; the overflow's arrival started a second worker, long
    # before the 60 s tick.
    wait_for(lambda: len(pool.cold_starts) == 2, "the overflow started a worker", timeout_s=20)
    assert pool.stats()["cold_requests"] == 0


def test_a_host_reserve_parks_idle_workers_and_promotes_one_for_a_request(
    make_pool: Callable[..., ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker turns READY on its reader thread before the pool's promoting thread
    # records it. A request placed in that gap was counted warm (CI saw it once); the
    # pause widens the gap so that this test always sees it.
    promote = WorkerProcess.promote

    def slow_to_record(self: WorkerProcess, **options: float) -> None:
        promote(self, **options)
        time.sleep(0.3)

    monkeypatch.setattr(WorkerProcess, "promote", slow_to_record)
    policy = PoolPolicy(
        min_warm=2, buffer=0, max_workers=2, keepalive_s=0.3, reserve_warmth=Warmth.HOST
    )
    pool = make_pool(policy)
    pool.start()
    router = PoolRouter({"m": pool})

    def parked() -> list[dict[str, object]]:
        return [r for r in pool.status() if r["state"] == "READY" and r["warmth"] == "HOST"]

    # The boot worker is demoted once idle past keepalive; the second starts at HOST.
    wait_for(lambda: len(parked()) == 2, "both workers parked at HOST")
    out = asyncio.run(collect(router, "m", "r1", SHORT))
    assert out[-1].usage.completion_tokens == 4
    stats = pool.stats()
    # Served by a promoted worker: no new process, and the request waited on it.
    assert stats["starts"] == 2 and stats["cold_requests"] == 1
    promoted = [p for p in pool.cold_starts.values() if "promote_s" in p]
    assert promoted and "bind_s" in promoted[0], pool.cold_starts
    # Idle again: it goes back to HOST; the processes stay.
    wait_for(lambda: len(parked()) == 2, "the promoted worker parked again")
    assert pool.stats()["starts"] == 2


def test_closing_with_a_drain_lets_running_requests_finish(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=1, buffer=0, max_workers=1))
    pool.start()
    router = PoolRouter({"m": pool})
    closer: list[threading.Thread] = []
    states: list[object] = []

    async def run() -> list[RequestOutput]:
        got = []
        prepared = router.prepare("m", [1, 2, 3], LONG, request_id="d", tenant="t")
        async for out in router.start(prepared):
            got.append(out)
            if len(got) == 2:  # mid-stream: the pool starts closing, draining first
                closer.append(threading.Thread(target=pool.close, kwargs={"drain_timeout_s": 60}))
                closer[0].start()
            if len(got) == 5:
                states.extend(r["state"] for r in pool.status())
        return got

    got = asyncio.run(run())
    closer[0].join(timeout=30)
    assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 300
    assert states == ["DRAINING"]
    assert pool.status() == []  # and then it stopped


def test_a_pool_of_several_workers_shares_the_model_and_gives_host_ram_back(
    tiny_home: Path, zygote: Zygote
) -> None:
    home = tiny_home
    model_dir = ModelCatalog(home).path_for("tiny")
    store, plan = auto_host_sharing(model_dir, max_workers=2, home=home)
    assert plan.enabled, plan.reason  # this machine's /dev/shm holds a tiny model
    catalog = store.catalog(home)
    tier = HostTier(catalog.host_cache_root, budget_bytes=store.host_cache_bytes)
    chunks = {c.hash for c in catalog.store().manifest("tiny").chunks}

    def disk() -> DiskTier:  # opened anew: a tier indexes its files when opened
        return next(t for t in catalog.store().tiers if isinstance(t, DiskTier))

    emptied = disk()  # as after an install: the model only in the bucket
    for key in emptied.keys():  # noqa: SIM118 - a tier, not a Mapping
        emptied.delete(key)
    policy = PoolPolicy(min_warm=2, buffer=0, max_workers=2, keepalive_s=60)
    pool = ModelPool(
        "tiny",
        home=home,
        policy=policy,
        engine_config=ONE_SEQ,
        store=store,
        release_host_tier=True,
        launcher=zygote,
        tick_s=0.05,
    )
    try:
        pool.start()
        wait_for(lambda: len([r for r in pool.status() if r["state"] == "READY"]) == 2, "2 READY")
        # The boot worker read the bucket and filled the disk tier (a phase of its cold
        # start), and mapped it; the second found it full. Both map the same files.
        fills = sorted(phases["fill_s"] for phases in pool.cold_starts.values())
        assert fills[0] == 0.0 and fills[1] > 0.0, pool.cold_starts
        by_tier = sorted(list(r["chunks_by_tier"].items()) for r in pool.status())
        assert by_tier == [[("bucket", len(chunks))], [("disk", len(chunks))]], by_tier
        assert set(disk().keys()) == chunks
        out = asyncio.run(collect(PoolRouter({"m": pool}), "m", "r", SHORT))
        assert out[-1].usage.completion_tokens == 4
        held = 0
        if sharing_works(torch.float32):  # ONE_SEQ computes in float32
            # One worker packed the matrices, for both: the other maps its copy, which
            # is all the host tier holds.
            wait_for(lambda: all(r["pack_shared"] for r in pool.status()), "shared packing")
            units = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] + 1
            assert sorted(r["packed_layers"] for r in pool.status()) == [0, units]
            held = tier.usage().size_bytes
            assert held > 0 and not set(tier.keys()) & chunks
        else:
            assert tier.usage().num_objects == 0
    finally:
        pool.close()
    # Closing gave the RAM back: nothing of the pool's is left in /dev/shm, not even the
    # folders (the index's dot-entries stay: another pool may be opening the tier).
    assert tier.usage().num_objects == 0
    assert [p.name for p in tier.root.iterdir() if not p.name.startswith(".")] == []
    assert pool.host_tier_released_bytes >= held
