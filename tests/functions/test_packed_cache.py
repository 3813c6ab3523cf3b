"""Packed matrices in the host tier: the first engine of a model to pack them all leaves
them there and then runs on the stored copy itself; the next maps them instead of
packing, runs packed from its first request, holds none of them in its own RAM, and
generates exactly the same tokens. An entry for other shapes, a half-written one, or no
host tier: every engine packs its own."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from ember_functions import packing as packing_module
from ember_functions import weights
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_model import HostModel
from ember_functions.linear import Linear
from ember_functions.loading import StoreConfig
from ember_functions.packed_cache import PackedCache, sharing_works
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_process import WorkerProcess
from ember_weights_store import ModelCatalog
from ember_weights_store.host_tier import HostTier

from .conftest import no_matrix_bound

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
DTYPES = [torch.float32, torch.bfloat16]


def config(dtype: torch.dtype) -> EngineConfig:
    name = str(dtype).removeprefix("torch.")
    return EngineConfig(dtype=name, num_kv_blocks=32, block_size=16, num_threads=1)


def skip_unless_shared(dtype: torch.dtype) -> None:
    if not Linear(device=torch.device("cpu"), dtype=dtype).packs or not sharing_works(dtype):
        pytest.skip(f"packed {dtype} matrices cannot be shared with this torch build and CPU")


def tokens(engine: LLMEngine) -> list[int]:
    (out,) = engine.generate([[3, 14, 15, 92, 65]], GREEDY)
    return out.token_ids


def stored_now(monkeypatch: pytest.MonkeyPatch) -> list[PackedCache]:
    """Makes ``store_in_background`` finish before it returns; lists what was stored."""
    stored: list[PackedCache] = []
    keep = PackedCache.store_in_background

    def store_and_wait(self: PackedCache, matrices: dict[str, torch.Tensor]) -> Future[bool]:
        stored.append(self)
        done = keep(self, matrices)
        done.result(timeout=60)
        return done

    monkeypatch.setattr(PackedCache, "store_in_background", store_and_wait)
    return stored


@pytest.fixture
def bound_together(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
) -> Callable[[int], list[LLMEngine]]:
    """``count`` float32 engines of the tiny llama bound from the host tier before any
    has packed, as a pool's workers started together are (skips where packed float32
    matrices cannot be shared)."""
    skip_unless_shared(torch.float32)
    model_dir, cfg = tiny_model("llama"), config(torch.float32)

    def bind(count: int) -> list[LLMEngine]:
        return [
            LLMEngine.from_host(host_model(host_catalog, model_dir), config=cfg)
            for _ in range(count)
        ]

    return bind


def assert_all_mapped(engine: LLMEngine) -> None:
    """Every packed matrix is a view of the one mapping of the host tier's copy."""
    total = len(engine.model.decoder_layers) + 1
    assert engine.packing.shared and engine.packing.units == total
    assert engine.packing.private_units == 0 and engine.packing.next_bytes() == 0
    backing = engine.model._shared_packing
    assert backing is not None
    lo, hi = backing.data_ptr(), backing.data_ptr() + backing.numel()
    for name, m in engine.model.packed_matrices().items():
        assert lo <= torch.ops.mkldnn.data_ptr(m) < hi, name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_the_next_engine_maps_what_the_first_packed_and_generates_the_same(
    dtype: torch.dtype,
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    skip_unless_shared(dtype)
    stored = stored_now(monkeypatch)
    model_dir = tiny_model("llama", dtype)
    first = LLMEngine.from_host(host_model(host_catalog, model_dir), config=config(dtype))
    assert first.packing.units == 0 and not first.model.packing_shared  # nothing there yet
    unpacked = tokens(first)
    assert first.packing.pack()
    assert len(stored) == 1 and stored[0].available()
    packed = tokens(first)
    assert first.packing.private_units == first.packing.units  # its own copies, until
    assert first.packing.share_stored()  # it switches to the stored ones
    assert_all_mapped(first)
    assert tokens(first) == packed
    assert not first.packing.share_stored()  # once

    second = LLMEngine.from_host(host_model(host_catalog, model_dir), config=config(dtype))
    assert_all_mapped(second)
    assert tokens(second) == packed
    total = len(second.model.decoder_layers) + 1
    assert second.packing.pack() and len(stored) == 1  # nothing to pack, nothing stored again
    assert second.packing.unpack() == 0 and second.packing.units == total  # frees nothing
    if dtype == torch.float32:
        assert packed == unpacked  # float32 packing changes no token of this model


def test_a_float32_engine_over_bf16_copies_checks_and_maps_the_stored_packing(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CPU without bf16 units a bf16 checkpoint binds no float32 matrix at all
    (``weights.deferred_matrix_names``), the first layer's included: the stored packed
    copy is checked against the first matrix converted for the check, and the next
    engine maps it and generates what the first did."""
    skip_unless_shared(torch.float32)
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: False)
    stored = stored_now(monkeypatch)
    model_dir = tiny_model("llama", torch.bfloat16)
    auto = EngineConfig(dtype="auto", num_kv_blocks=32, block_size=16, num_threads=1)
    first = LLMEngine.from_host(host_model(host_catalog, model_dir), config=auto)
    assert first.model.dtype == torch.float32
    assert no_matrix_bound(first)
    assert len(tokens(first)) == GREEDY.max_tokens  # every matrix converted per call
    assert first.packing.pack() and len(stored) == 1
    packed = tokens(first)

    second = LLMEngine.from_host(host_model(host_catalog, model_dir), config=auto)
    assert second.model.packing_shared  # the check passed on a matrix bound as meta
    assert_all_mapped(second)
    assert no_matrix_bound(second)
    assert tokens(second) == packed


def store_later(monkeypatch: pytest.MonkeyPatch) -> list[StoreCall]:
    """Makes ``store_in_background`` wait for the test: it lists each call, whose future
    the test resolves (``finish``)."""
    calls: list[StoreCall] = []

    def later(self: PackedCache, matrices: dict[str, torch.Tensor]) -> Future[bool]:
        calls.append((self, dict(matrices), Future()))
        return calls[-1][2]

    monkeypatch.setattr(PackedCache, "store_in_background", later)
    return calls


StoreCall = tuple[PackedCache, dict[str, torch.Tensor], "Future[bool]"]


def finish(call: StoreCall, *, fail: bool = False) -> None:
    cache, matrices, pending = call
    pending.set_result(False if fail else cache.store(matrices))


def test_engines_started_together_pack_once_for_all(
    bound_together: Callable[[int], list[LLMEngine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool's workers started at once all bind before any packed copy is stored. The
    first to pack takes the machine's lease; the others pack nothing, through the
    packing and the store, and map its copy once it lands."""
    packer, waiter = bound_together(2)
    want = tokens(packer)
    assert not packer.packing.pack(max_layers=1) and packer.packing.packed_layers == 1
    assert waiter.packing.waits_for_another()
    assert not waiter.packing.pack(max_layers=1)
    assert waiter.packing.packed_layers == 0 and waiter.packing.private_units == 0
    calls = store_later(monkeypatch)
    assert packer.packing.pack() and len(calls) == 1  # all packed; the store on its way
    assert waiter.packing.waits_for_another()  # through the store too
    assert not waiter.packing.pack(max_layers=1) and waiter.packing.packed_layers == 0
    finish(calls[0])
    assert not waiter.packing.waits_for_another()
    assert waiter.packing.pack(max_layers=1)  # mapped the stored copy
    assert_all_mapped(waiter)
    assert waiter.packing.packed_layers == 0
    assert packer.packing.share_stored()
    assert_all_mapped(packer)
    assert tokens(packer) == tokens(waiter) == want


def test_a_slow_packer_keeps_the_lease_for_as_long_as_its_next_layer_should_take(
    bound_together: Callable[[int], list[LLMEngine]],
    host_catalog: ModelCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a layer takes longer than ``PACK_LEASE_STALE_S`` allows for (here 0), the
    packer renews saying how long the next should take, times ``PACK_LEASE_PACES``
    (here a million: hours), and waiters wait that long instead of taking over."""
    monkeypatch.setattr(packing_module, "PACK_LEASE_STALE_S", 0.0)
    monkeypatch.setattr(packing_module, "PACK_LEASE_PACES", 1e6)
    packer, waiter = bound_together(2)
    assert packer.packing.lease_stale_s() == 0.0  # no pace measured yet
    assert not packer.packing.pack(max_layers=1)
    assert packer.packing.lease_stale_s() > 60.0
    for record in (host_catalog.host_cache_root / ".leases").glob("*.json"):  # a minute old
        then = record.stat().st_mtime - 60.0
        os.utime(record, (then, then))
    assert waiter.packing.waits_for_another()
    assert not waiter.packing.pack(max_layers=1) and waiter.packing.packed_layers == 0


def test_a_packer_that_stops_renewing_loses_the_lease_and_copies_converge(
    bound_together: Callable[[int], list[LLMEngine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A packer that renews nothing for as long as it said (``PACK_LEASE_STALE_S`` and
    ``PACK_LEASE_PACES`` here 0: at once) loses the lease to the next that packs, packs
    no further, and maps the copy stored; a second store of the same copy writes nothing."""
    monkeypatch.setattr(packing_module, "PACK_LEASE_STALE_S", 0.0)
    monkeypatch.setattr(packing_module, "PACK_LEASE_PACES", 0.0)
    stalled, taker, late = bound_together(3)
    want = tokens(stalled)
    assert not stalled.packing.pack(max_layers=1)  # a layer, then it serves a while
    assert not taker.packing.waits_for_another()
    calls = store_later(monkeypatch)
    assert taker.packing.pack() and len(calls) == 1  # took the lease; storing holds it
    assert stalled.packing.waits_for_another() and late.packing.waits_for_another()
    assert not stalled.packing.pack(max_layers=1) and stalled.packing.packed_layers == 1
    finish(calls[0])
    assert stalled.packing.pack(max_layers=1)  # mapped the stored copy, packed no more
    assert_all_mapped(stalled)
    assert stalled.packing.packed_layers == 1
    assert taker.packing.share_stored() and late.packing.pack()
    assert_all_mapped(taker)
    assert_all_mapped(late)
    assert all(tokens(e) == want for e in (stalled, taker, late))
    cache, matrices, _ = calls[0]
    assert cache.store(matrices)  # there already: writes nothing
    assert len([k for k in cache.host.keys() if k.startswith("packed/")]) == 2  # noqa: SIM118


def test_a_store_that_fails_frees_the_lease_for_the_next_engine(
    bound_together: Callable[[int], list[LLMEngine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = bound_together(2)
    calls = store_later(monkeypatch)
    assert first.packing.pack() and second.packing.waits_for_another()
    finish(calls[0], fail=True)  # the tier was full, say
    assert not second.packing.waits_for_another()
    assert second.packing.pack()  # all of them itself
    assert second.packing.packed_layers == len(second.model.decoder_layers) + 1


def test_an_entry_for_other_shapes_or_half_written_is_not_used(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    skip_unless_shared(torch.float32)
    stored_now(monkeypatch)
    cfg = config(torch.float32)
    first = LLMEngine.from_host(host_model(host_catalog, tiny_model("llama")), config=cfg)
    first.packing.pack()
    model = first.model
    cache = first.packing.cache
    assert cache is not None and cache.available()
    plain = model.unpacked_matrices()
    assert cache.load(plain, pack=model.linear.pack) is not None
    head = plain.pop("head")
    assert cache.load(plain, pack=model.linear.pack) is None  # a matrix short
    other = {**plain, "head": head[:-1]}
    assert cache.load(other, pack=model.linear.pack) is None  # another vocabulary
    # The index is written last and names the object: without it nothing is read.
    (tier,) = [t for t in host_catalog.store().tiers if isinstance(t, HostTier)]
    tier.delete(cache.index_key)
    assert not cache.available() and cache.load(plain, pack=model.linear.pack) is None


def _rss_shmem_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/self/status")


def test_a_loaded_entry_has_every_page_mapped_before_any_step_reads_it(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
) -> None:
    skip_unless_shared(torch.float32)
    first = LLMEngine.from_host(
        host_model(host_catalog, tiny_model("llama")), config=config(torch.float32)
    )
    first.packing.pack()
    cache = first.packing.cache
    assert cache is not None
    deadline = time.monotonic() + 30
    while not cache.available():  # stored on a thread
        assert time.monotonic() < deadline, "the packed matrices were never stored"
        time.sleep(0.01)
    before = _rss_shmem_kib()
    shared = cache.load(first.model.unpacked_matrices(), pack=first.model.linear.pack)
    assert shared is not None
    # The tier's pages, all mapped into this process at once, none copied.
    assert _rss_shmem_kib() - before >= (shared.backing.numel() >> 10) * 0.9


def test_without_a_host_tier_every_engine_packs_its_own(
    tmp_path: Path,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
) -> None:
    host = host_model(ModelCatalog(tmp_path / "plain"), tiny_model("llama"))
    assert host.packed_cache(torch.float32, pack_rows=512) is None
    engine = LLMEngine.from_host(host, config=config(torch.float32))
    engine.packing.pack()
    assert not engine.model.packing_shared
    assert engine.packing.private_units == engine.packing.units


def test_worker_processes_say_they_run_on_the_shared_packing(tiny_home: Path) -> None:
    skip_unless_shared(torch.float32)
    _two_workers(tiny_home, StoreConfig(host_cache_bytes=256 << 20))


def _two_workers(home: Path, store: StoreConfig) -> None:
    want: list[int] = []
    for i, shared in enumerate((False, True)):
        worker = WorkerProcess.spawn(
            worker_id=f"pk-{os.getpid()}-{time.monotonic_ns()}",
            model="tiny",
            home=home,
            engine_config=config(torch.float32),
            store=store,
        )
        try:
            assert worker.wait_packed(timeout_s=60) and worker.packed is not None
            assert worker.packed.shared is shared and worker.describe()["pack_shared"] is shared
            request = worker.prepare([3, 14, 15, 92, 65], GREEDY, request_id=f"r{i}")
            got = worker.submit_prepared(request).result().token_ids
            want = want or got
            assert got == want
            if not shared:
                # The first leaves its packing behind, on a thread, then (idle) runs on
                # that copy too and frees its own: it says so in a second "packed" frame.
                deadline = time.monotonic() + 30
                while not (worker.packed and worker.packed.shared):
                    assert time.monotonic() < deadline, "the first worker kept its own copy"
                    time.sleep(0.05)
                assert any(k.endswith("-index") for k in _packed_keys(store, home))
                again = worker.prepare([3, 14, 15, 92, 65], GREEDY, request_id="r-again")
                assert worker.submit_prepared(again).result().token_ids == want
        finally:
            worker.close()


def _packed_keys(store: StoreConfig, home: Path) -> list[str]:
    (tier,) = [t for t in store.catalog(home).store().tiers if isinstance(t, HostTier)]
    return [k for k in tier.keys() if k.startswith("packed/")]  # noqa: SIM118


def test_share_packing_off_neither_maps_nor_leaves_packed_matrices(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    skip_unless_shared(torch.float32)
    stored = stored_now(monkeypatch)
    off = dataclasses.replace(config(torch.float32), share_packing=False)
    alone = LLMEngine.from_host(host_model(host_catalog, tiny_model("llama")), config=off)
    alone.packing.pack()
    assert stored == [] and not alone.model.packing_shared  # packed, left nothing
    first = LLMEngine.from_host(
        host_model(host_catalog, tiny_model("llama")), config=config(torch.float32)
    )
    first.packing.pack()
    assert len(stored) == 1  # on: it leaves its packing
    again = LLMEngine.from_host(host_model(host_catalog, tiny_model("llama")), config=off)
    assert not again.model.packing_shared and again.packing.units == 0  # off: not mapped
