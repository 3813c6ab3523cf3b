"""Bound weights in the host tier: the first worker to bind a bf16 model for float32
compute keeps the result; the next maps it instead of converting, and generates exactly
the same tokens. A store without a host tier, or a checkpoint already in the compute
dtype, keeps nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ember_functions.bound_cache import BoundCache
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_model import HostModel
from ember_functions.sampling_params import SamplingParams
from ember_weights_store import ModelCatalog
from ember_weights_store.host_tier import HostTier

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=32, block_size=16, num_threads=1)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tokens(engine: LLMEngine) -> list[int]:
    (out,) = engine.generate([[3, 14, 15, 92, 65]], GREEDY)
    return out.token_ids


def test_the_second_bind_maps_what_the_first_kept_and_generates_the_same(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = tiny_model("llama", torch.bfloat16)
    first_host = host_model(host_catalog, model_dir)
    cache = first_host.bound_cache(torch.float32)
    assert cache is not None and cache.load({}) is None  # nothing kept yet
    stored: list[BoundCache] = []
    keep = BoundCache.store_in_background

    def store_and_wait(self: BoundCache, state: dict[str, torch.Tensor]) -> object:
        stored.append(self)
        thread = keep(self, state)
        thread.join()
        return thread

    monkeypatch.setattr(BoundCache, "store_in_background", store_and_wait)
    first = LLMEngine.from_host(first_host, config=CONFIG)
    assert stored == [cache]  # it converted, and kept the result

    loads: list[bool] = []
    real_load = BoundCache.load

    def counting_load(self: BoundCache, expected: dict[str, torch.Size]) -> object:
        state = real_load(self, expected)
        loads.append(state is not None)
        return state

    monkeypatch.setattr(BoundCache, "load", counting_load)
    second = LLMEngine.from_host(host_model(host_catalog, model_dir), config=CONFIG)
    assert loads == [True] and len(stored) == 1  # mapped, nothing converted or stored again
    assert second.model.dtype == torch.float32
    assert tokens(second) == tokens(first)


def test_a_mismatched_entry_is_not_used(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
) -> None:
    host = host_model(host_catalog, tiny_model("llama", torch.bfloat16))
    cache = host.bound_cache(torch.float32)
    assert cache is not None
    cache.store({"embed": torch.zeros(4, 8)})
    assert cache.load({"embed": torch.Size([4, 8])}) is not None
    assert cache.load({"embed": torch.Size([8, 4])}) is None  # another model's shapes
    other = host.bound_cache(torch.float16)
    assert other is not None and other.key != cache.key  # one entry per compute dtype


def test_an_entry_whose_data_the_tier_evicted_is_a_quiet_miss(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = host_model(host_catalog, tiny_model("llama", torch.bfloat16))
    cache = host.bound_cache(torch.float32)
    assert cache is not None
    cache.store({"embed": torch.zeros(4, 8)})
    cache.host.delete(cache.key)  # as eviction leaves it: the index without its data
    with caplog.at_level("WARNING", logger="ember_functions.bound_cache"):
        assert cache.load({"embed": torch.Size([4, 8])}) is None
    assert not caplog.records  # a full tier is not a fault to warn about
    cache.store({"embed": torch.ones(4, 8)})  # the next binder keeps it again
    state = cache.load({"embed": torch.Size([4, 8])})
    assert state is not None and bool((state["embed"] == 1).all())


def test_no_host_tier_or_no_conversion_keeps_nothing(
    tmp_path: Path,
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
) -> None:
    plain = ModelCatalog(tmp_path / "plain")  # no host tier
    assert host_model(plain, tiny_model("llama", torch.bfloat16)).bound_cache(torch.float32) is None
    host = host_model(host_catalog, tiny_model("llama", torch.float32))
    LLMEngine.from_host(host, config=CONFIG)  # float32 -> float32: nothing to convert
    (tier,) = [t for t in host_catalog.store().tiers if isinstance(t, HostTier)]
    assert not [k for k in tier.keys() if k.startswith("bound/")]  # noqa: SIM118


def test_tensors_of_mixed_dtypes_and_sizes_come_back_as_stored(tmp_path: Path) -> None:
    tier = HostTier(tmp_path / "host", budget_bytes=1 << 20)
    cache = BoundCache(tier, "bound/test-v1")
    gen = torch.Generator().manual_seed(0)
    state = {
        "odd": torch.randn(3, 5, generator=gen),  # 60 bytes: the next starts padded
        "half": torch.randn(7, generator=gen).to(torch.bfloat16),
        "view": torch.randn(6, 4, generator=gen).t(),  # not contiguous
        "empty": torch.zeros(0, 4),
    }
    cache.store(state)
    loaded = cache.load({n: t.shape for n, t in state.items()})
    assert loaded is not None
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
        assert loaded[name].data_ptr() % 64 == 0 or t.numel() == 0  # cache-line aligned


def test_storing_holds_no_staging_copy_of_the_weights(tmp_path: Path) -> None:
    # In a new interpreter, so its peak RSS is this store's: 256 MiB of weights written
    # out may raise it by far less than a second copy of them would.
    code = f"""
import resource, torch
from pathlib import Path
from ember_functions.bound_cache import BoundCache
from ember_weights_store.host_tier import HostTier

state = {{f"w{{i}}": torch.ones(1 << 22) for i in range(16)}}  # 16 x 16 MiB, touched
tier = HostTier(Path({str(tmp_path / "host")!r}), budget_bytes=1 << 30)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
BoundCache(tier, "bound/big-v1").store(state)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # KiB
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    grown_mib = int(out.stdout.strip().splitlines()[-1]) / 1024
    assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB storing 256 MiB"
