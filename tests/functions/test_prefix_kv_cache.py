"""The public prefix's KV in the host tier: the first engine of a model computes the chat
preamble and keeps its KV; the next binds with it pinned, before any request, and its
first chat request gets the preamble cached and the tokens of a fresh prefill."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_model import HostModel
from ember_functions.prefix_kv_cache import PrefixKVCache
from ember_functions.sampling_params import SamplingParams
from ember_weights_store import ModelCatalog

from .test_public_prefix import TEMPLATE, chat, run, with_template

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)
HostModelFactory = Callable[[ModelCatalog, Path], HostModel]


@pytest.fixture
def system_model(copy_model: Callable[..., Path]) -> Path:
    return with_template(copy_model("llama"), TEMPLATE)


def kept(host: HostModel, config: EngineConfig = CONFIG) -> PrefixKVCache:
    cache = host.prefix_kv_cache(torch.float32, block_size=config.block_size)
    assert cache is not None  # the store has a host tier
    return cache


def test_the_next_engine_binds_with_the_preamble_the_first_computed(
    host_catalog: ModelCatalog, host_model: HostModelFactory, system_model: Path
) -> None:
    first = LLMEngine.from_host(host_model(host_catalog, system_model), config=CONFIG)
    assert first.public_prefix_tokens is None  # nothing kept yet: computed once idle
    preamble = first.cache_public_prefix()
    assert preamble == len(first.tokenizer.chat_preamble()) > 16  # whole blocks and a tail
    host = host_model(host_catalog, system_model)
    assert host.host_tier is not None and host.host_tier.has(kept(host).index_key)

    second = LLMEngine.from_host(host, config=CONFIG)
    assert second.public_prefix_tokens == preamble  # at bind, before any request
    assert second.blocks.public_prefix == first.blocks.public_prefix
    assert torch.equal(
        second.kv_cache.read_blocks(second.blocks.public_prefix_blocks()),
        first.kv_cache.read_blocks(first.blocks.public_prefix_blocks()),
    )
    assert second.cache_public_prefix() == preamble  # nothing left to compute
    fresh = LLMEngine.from_dir(system_model, config=dataclasses.replace(CONFIG, prefix_cache=False))
    for salt, question in (("tenant:a", "What is 2+2?"), ("tenant:b", "Name a colour.")):
        tokens, hit = run(second, chat(question), salt)
        assert hit == preamble
        assert tokens == run(fresh, chat(question), salt)[0]


def test_an_engine_without_a_prefix_cache_restores_nothing(
    host_catalog: ModelCatalog, host_model: HostModelFactory, system_model: Path
) -> None:
    LLMEngine.from_host(host_model(host_catalog, system_model), config=CONFIG).cache_public_prefix()
    off = dataclasses.replace(CONFIG, prefix_cache=False)
    engine = LLMEngine.from_host(host_model(host_catalog, system_model), config=off)
    assert engine.public_prefix_tokens is None
    assert engine.blocks.num_pinned_blocks == 0


def test_another_block_size_or_template_is_another_entry(
    host_catalog: ModelCatalog, host_model: HostModelFactory, system_model: Path, tmp_path: Path
) -> None:
    LLMEngine.from_host(host_model(host_catalog, system_model), config=CONFIG).cache_public_prefix()
    other_blocks = dataclasses.replace(CONFIG, block_size=8)
    engine = LLMEngine.from_host(host_model(host_catalog, system_model), config=other_blocks)
    assert engine.public_prefix_tokens is None
    # The same weights under another chat template: another preamble, another key.
    retemplated = tmp_path / "retemplated"
    shutil.copytree(system_model, retemplated)
    with_template(retemplated, TEMPLATE.replace("careful", "cheerful"))
    a, b = host_model(host_catalog, system_model), host_model(host_catalog, retemplated)
    assert kept(a).key != kept(b).key
    assert LLMEngine.from_host(b, config=CONFIG).public_prefix_tokens is None


@pytest.mark.parametrize("damage", ["truncated", "shape", "tokens", "index only"])
def test_a_damaged_entry_is_a_miss_and_the_engine_computes_the_preamble(
    host_catalog: ModelCatalog,
    host_model: HostModelFactory,
    system_model: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = LLMEngine.from_host(host_model(host_catalog, system_model), config=CONFIG)
    preamble = first.cache_public_prefix()
    host = host_model(host_catalog, system_model)
    cache, tier = kept(host), host.host_tier
    assert tier is not None
    index = json.loads(tier.get(cache.index_key))
    if damage == "truncated":
        tier.put(cache.key, tier.get(cache.key)[:-2])
    elif damage == "shape":
        tier.put(cache.index_key, json.dumps({**index, "shape": [1, 2, 3]}).encode())
    elif damage == "tokens":  # ids this model's vocabulary does not have
        tier.put(cache.index_key, json.dumps({**index, "tokens": [10**9] * preamble}).encode())
    else:
        tier.delete(cache.key)  # evicted, its index left
    engine = LLMEngine.from_host(host, config=CONFIG)
    assert engine.public_prefix_tokens is None
    assert engine.cache_public_prefix() == preamble  # computed, and kept again
    assert LLMEngine.from_host(host, config=CONFIG).public_prefix_tokens == preamble


def test_a_store_without_a_host_tier_keeps_nothing(
    host_model: HostModelFactory, system_model: Path, tmp_path: Path
) -> None:
    host = host_model(ModelCatalog(tmp_path / "home"), system_model)
    assert host.prefix_kv_cache(torch.float32, block_size=16) is None
    engine = LLMEngine.from_host(host, config=CONFIG)
    assert engine.cache_public_prefix() > 0 and engine.prefix_kv is None


def test_a_new_worker_serves_its_first_chat_with_the_preamble_cached(
    system_model: Path, install_home: Callable[[Path], Path]
) -> None:
    """The cold start a request waits for: a worker that was never idle, whose model's
    first worker on this machine computed the preamble."""
    from ember_functions.loading import StoreConfig
    from ember_functions.worker_process import WorkerProcess

    home = install_home(system_model)
    store = StoreConfig(host_cache_bytes=256 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got: list[tuple[int, list[int]]] = []
    for i in range(2):
        worker = WorkerProcess.spawn(
            worker_id=f"pkv-{os.getpid()}-{i}",
            model="tiny",
            home=home,
            engine_config=CONFIG,
            store=store,
        )
        try:
            # At once, before the worker was ever idle (it caches the preamble then).
            request = worker.prepare(chat("What is 2+2?"), greedy, request_id=f"r{i}")
            out = worker.submit_prepared(request).result()
            got.append((out.usage.cached_tokens, out.token_ids))
            if i == 0:
                assert worker.wait_packed(timeout_s=60)  # idle: preamble computed, kept
        finally:
            worker.close()
    preamble = len(LLMEngine.from_dir(system_model, config=CONFIG).tokenizer.chat_preamble())
    assert [cached for cached, _ in got] == [0, preamble]
    assert got[0][1] == got[1][1]
