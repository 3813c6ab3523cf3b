"""An engine's packed copies give their RAM back to the machine when dropped: given back
under pressure (``Packing.unpack``), the freed pages leave the process, not just its heap
(glibc keeps most freed blocks of a few MiB for reuse unless trimmed). And once packed,
the engine hands back its mapping of the unpacked matrices the copies stand in for."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from ember_functions.config import ModelConfig
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_memory import ProcessMemory, read_process_memory
from ember_functions.loading import StoreConfig, load_host
from ember_functions.sampling_params import SamplingParams
from ember_functions.tokenizer import Tokenizer
from ember_functions.weights import build_model, iter_hf_tensors
from ember_weights_store import load

from .conftest import no_matrix_bound

MIB = 1 << 20


def own_memory() -> ProcessMemory:
    memory = read_process_memory(os.getpid())
    if memory is None:
        pytest.skip("no /proc/PID/smaps_rollup here")
    return memory


def anonymous_bytes() -> int:
    return own_memory().anonymous_bytes


def proportional_bytes() -> int:
    return own_memory().proportional_bytes


def test_unpacking_every_layer_returns_the_packed_copies_to_the_os(smollm2_dir: Path) -> None:
    # Two threads, as a worker here runs: oneDNN packs on its OpenMP threads, and their
    # malloc arenas keep what they free (182 of ~250 MiB stayed, untrimmed; with one
    # thread, the main arena's large blocks are unmapped at once). float32 named, so no
    # layer has single-row copies, which would leave its matrices unconverted instead
    # (the next test).
    config = EngineConfig(num_threads=2, kv_cache_bytes=16 << 20, dtype="float32")
    engine = LLMEngine.from_dir(smollm2_dir, config=config)
    if not engine.model.linear.packs:
        pytest.skip("oneDNN packing does not apply on this CPU")
    before = anonymous_bytes()
    assert engine.packing.pack()
    packed = anonymous_bytes() - before
    assert packed > 200 * MIB  # SmolLM2's packed float32 matrices: ~460 MiB
    freed = 0
    while step := engine.packing.unpack():
        freed += step
    assert freed > 200 * MIB
    assert anonymous_bytes() - before < packed * 0.25


def test_a_bf16_checkpoint_computed_in_float32_binds_without_float32_matrices(
    smollm2_dir: Path,
) -> None:
    """A CPU without bf16 matmul units computes SmolLM2's bf16 checkpoint in float32 and
    keeps the checkpoint's bf16 matrices for single-row decode. The engine binds without
    float32 copies of them: a multi-row step converts each per call, packing converts
    each once. The packed engine generates what the unpacked one did, and unpacking
    gives every packed copy back, the layers running on their bf16 copies again. Built
    with that dtype pair on any CPU."""
    tokenizer = Tokenizer.from_dir(smollm2_dir)

    def engine(gemv_dtype: torch.dtype | None) -> LLMEngine:
        model = build_model(
            ModelConfig.from_dir(smollm2_dir),
            iter_hf_tensors(smollm2_dir),
            source=str(smollm2_dir),
            dtype=torch.float32,
            device=torch.device("cpu"),
            gemv_dtype=gemv_dtype,
        )
        config = EngineConfig(num_threads=2, kv_cache_bytes=16 << 20)
        return LLMEngine(model, tokenizer, config=config, model_name="smollm2")

    def float32_bytes(e: LLMEngine) -> int:
        # The model's own float32 tensors, not the process's growth: freed heap from the
        # tests before may be reused (a CI run measured 230 MiB for the eager build).
        params = [p for p in e.model.parameters() if p.dtype == torch.float32 and not p.is_meta]
        return sum(p.numel() * p.element_size() for p in params)

    eager_bytes = float32_bytes(engine(None))
    gc.collect()
    deferred = engine(torch.bfloat16)
    deferred_bytes = float32_bytes(deferred)
    # SmolLM2's 30 layers hold ~400 MiB of float32 matrices.
    assert eager_bytes - deferred_bytes > 300 * MIB, (eager_bytes, deferred_bytes)
    layers = deferred.model.decoder_layers
    assert no_matrix_bound(deferred)

    prompt = [{"role": "user", "content": "Name a color."}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (want,) = deferred.generate([prompt], params)
    assert deferred.model.linear._scratch.numel() > 0  # the prefill converted matrices
    if not deferred.model.linear.packs:
        pytest.skip("oneDNN packing does not apply on this CPU")
    assert deferred.packing.pack()
    assert deferred.model.linear._scratch.numel() == 0  # nothing converts per call now
    assert no_matrix_bound(deferred)
    assert deferred.generate([prompt], params)[0].token_ids == want.token_ids
    units = len(layers) + 1
    assert deferred.packing.private_units == units
    freed = 0
    while step := deferred.packing.unpack():
        freed += step
    assert freed > 300 * MIB  # every packed copy: ~460 MiB
    assert deferred.generate([prompt], params)[0].token_ids == want.token_ids


def test_a_packed_engine_hands_back_its_mapping_of_the_unpacked_matrices(
    smollm2_dir: Path, ember_test_home: Path
) -> None:
    """Mapped from the disk tier's chunk files, the matrices the packed copies stand in
    for leave the process once packed (their pages stay in the page cache, reclaimable),
    and come back from the file, unchanged, when a layer runs unpacked again."""
    store = StoreConfig(host_cache_bytes=0)
    catalog = store.catalog(ember_test_home)
    load(catalog.store(), "smollm2-135m").wait_promoted()  # the disk tier holds every chunk
    host = load_host(catalog, "smollm2-135m", err=sys.stderr)
    assert host.report is not None and host.report.mapped and host.mapped_storages()
    engine = LLMEngine.from_host(host, config=EngineConfig(num_threads=2, kv_cache_bytes=16 << 20))
    if not engine.model.linear.packs:
        pytest.skip("oneDNN packing does not apply on this CPU")
    if engine.model.dtype != torch.bfloat16:
        pytest.skip(
            "this CPU computes SmolLM2's bf16 checkpoint in float32: its bound matrices "
            "are converted copies, not mappings of the chunk files"
        )
    prompt = [{"role": "user", "content": "Write a haiku about the sea."}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (want,) = engine.generate([prompt], params)

    before = proportional_bytes()
    assert engine.packing.pack()
    # SmolLM2's layers' matrices, bf16: 202.5 MiB; and its LM head, which is the
    # embedding (54 MiB): lookups bring back only the rows they read.
    released = engine.packing.released_bytes
    assert 245 * MIB < released < 257 * MIB
    packed = sum(m.numel() * m.element_size() for m in engine.model.unpacked_matrices().values())
    # The packed copies came in, the mapped matrices went: the process grew by far less
    # than the copies.
    assert proportional_bytes() - before < packed - released + 40 * MIB
    (got,) = engine.generate([prompt], params)
    assert got.token_ids == want.token_ids

    while engine.packing.unpack():  # every layer on its unpacked matrices, read again
        pass
    (again,) = engine.generate([prompt], params)
    assert again.token_ids == want.token_ids


def test_an_engine_on_its_own_copies_of_the_weights_hands_back_nothing(
    smollm2_dir: Path,
) -> None:
    """Weights this process read into its own memory are not mapped files: handing their
    pages back would zero them. Nothing is."""
    engine = LLMEngine.from_dir(
        smollm2_dir, config=EngineConfig(num_threads=2, kv_cache_bytes=16 << 20)
    )
    if not engine.model.linear.packs:
        pytest.skip("oneDNN packing does not apply on this CPU")
    prompt = [{"role": "user", "content": "Name a color."}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (want,) = engine.generate([prompt], params)
    assert engine.packing.pack() and engine.packing.released_bytes == 0
    while engine.packing.unpack():
        pass
    assert engine.generate([prompt], params)[0].token_ids == want.token_ids
