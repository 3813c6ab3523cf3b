"""Import a model into tiers, load it back: exact tensors, fallback past corrupt copies,
clear errors when no good copy exists, deduplicated fine-tunes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember_core import ModelFormatError, NotFoundError
from ember_weights_store import DiskTier, LocalBucketTier
from ember_weights_store.digests import sha256_key
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore

CHUNK = 16 * 1024  # small chunks, so a tiny model has many


def stores(tmp_path: Path) -> tuple[WeightsStore, DiskTier, LocalBucketTier]:
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=64 << 20)
    return WeightsStore([disk, bucket]), disk, bucket


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_then_load_gives_identical_tensors(
    tiny_model: Callable[..., Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    model_dir = tiny_model("qwen2", dtype)
    store, _, _ = stores(tmp_path)
    report = store.import_hf_dir(model_dir, model_id="acme/tiny", chunk_size_bytes=CHUNK)
    assert report.num_chunks > 4 and report.dedup_bytes == 0
    loaded = load(store, "acme/tiny")
    original = load_file(str(model_dir / "model.safetensors"))
    assert set(loaded.tensors) == set(original)
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name
    assert loaded.report.chunks_by_tier == {"bucket": report.num_chunks}
    # Every chunk is promoted into the disk tier in the background: once that is done,
    # the next cold start never leaves it.
    assert loaded.wait_promoted() == report.raw_bytes
    # Copied (not mapped, which ignores reuse=) into the first load's buffers.
    again = load(store, "acme/tiny", reuse=loaded, zero_copy=False)
    assert again.report.chunks_by_tier == {"disk": report.num_chunks}
    assert (
        again.buffers["bfloat16" if dtype == torch.bfloat16 else "float32"]
        is loaded.buffers["bfloat16" if dtype == torch.bfloat16 else "float32"]
    )
    assert (
        store.tokenizer_file(loaded.manifest, "tokenizer.json")
        == (model_dir / "tokenizer.json").read_bytes()
    )


def test_corrupt_chunk_is_discarded_and_fetched_from_the_next_tier(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    store, disk, bucket = stores(tmp_path)
    store.import_hf_dir(tiny_model("llama"), model_id="tiny", chunk_size_bytes=CHUNK)
    first = load(store, "tiny")
    first.wait_promoted()
    victim = first.manifest.chunks[3].hash
    data = bytearray(disk.get(victim))
    data[len(data) // 2] ^= 0xFF
    disk.put(victim, bytes(data))
    second = load(store, "tiny")
    assert second.report.discarded == [f"disk:{victim}"]
    assert second.report.chunks_by_tier["bucket"] == 1
    for name, t in first.tensors.items():
        assert torch.equal(second.tensors[name], t)
    second.wait_promoted()
    # The good copy was promoted back, decoded: the disk tier holds raw chunk bytes.
    assert sha256_key(disk.get(victim)) == victim
    assert disk.get(victim) != bucket.get(victim)  # the bucket holds it compressed


def test_no_good_copy_names_model_chunk_and_tiers(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    store, _, bucket = stores(tmp_path)
    store.import_hf_dir(tiny_model("llama"), model_id="tiny", chunk_size_bytes=CHUNK)
    victim = store.manifest("tiny").chunks[0].hash
    bucket.put(victim, b"\x00" * len(bucket.get(victim)))
    with pytest.raises(ModelFormatError) as err:
        load(store, "tiny")
    msg = err.value.message
    assert "'tiny'" in msg and victim in msg and "bucket (corrupt, discarded)" in msg
    assert "disk (absent)" in msg


def test_unknown_model_is_not_found(tmp_path: Path) -> None:
    store, _, _ = stores(tmp_path)
    with pytest.raises(NotFoundError, match="import it first"):
        load(store, "nobody/nothing")


def test_fine_tune_sharing_tensors_stores_only_new_chunks(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    base = tiny_model("llama")
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    weights = load_file(str(tuned / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] = (
        weights["model.layers.1.mlp.down_proj.weight"] + 1
    )
    save_file(weights, str(tuned / "model.safetensors"))
    store, _, _ = stores(tmp_path)
    first = store.import_hf_dir(base, model_id="base", chunk_size_bytes=CHUNK)
    second = store.import_hf_dir(tuned, model_id="base-tuned", chunk_size_bytes=CHUNK)
    assert second.dedup_bytes > 0.8 * second.raw_bytes
    assert second.stored_bytes < 0.2 * first.stored_bytes
    loaded = load(store, "base-tuned")
    assert torch.equal(
        loaded.tensors["model.layers.1.mlp.down_proj.weight"],
        weights["model.layers.1.mlp.down_proj.weight"],
    )


def test_engine_loads_through_the_store_and_answers_like_the_directory(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    from ember_functions.engine import LLMEngine
    from ember_functions.engine_config import EngineConfig
    from ember_functions.sampling_params import SamplingParams

    model_dir = tiny_model("smollm2")
    store, _, _ = stores(tmp_path)
    store.import_hf_dir(model_dir, model_id="acme/smol", chunk_size_bytes=CHUNK)
    config = EngineConfig(dtype="float32", num_kv_blocks=32)
    from_store = LLMEngine.from_store(
        store, "acme/smol", config=config, tokenizer_cache=tmp_path / "tok"
    )
    from_dir = LLMEngine.from_dir(model_dir, config=config)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [{"role": "user", "content": "hello there"}]
    assert from_store.generate([prompt], params)[0].token_ids == (
        from_dir.generate([prompt], params)[0].token_ids
    )
    assert from_store.load_report is not None and from_store.load_report.raw_bytes > 0
    assert from_store.model_name == "acme/smol"


def test_remove_model_keeps_chunks_another_model_shares(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    base = tiny_model("llama")
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    weights = load_file(str(tuned / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(tuned / "model.safetensors"))
    store, disk, bucket = stores(tmp_path)
    store.import_hf_dir(base, model_id="org/base", chunk_size_bytes=CHUNK)
    store.import_hf_dir(tuned, model_id="org/tuned", chunk_size_bytes=CHUNK)
    load(store, "org/tuned").wait_promoted()
    assert store.list_models() == [("org/base", "main"), ("org/tuned", "main")]
    only_tuned = {c.hash for c in store.manifest("org/tuned").chunks} - {
        c.hash for c in store.manifest("org/base").chunks
    }
    assert only_tuned
    store.remove_model("org/tuned")
    assert store.list_models() == [("org/base", "main")]
    for key in only_tuned:
        assert not bucket.has(key) and not disk.has(key)
    base_loaded = load(store, "org/base")  # every chunk it needs is still there
    assert torch.equal(
        base_loaded.tensors["model.norm.weight"],
        load_file(str(base / "model.safetensors"))["model.norm.weight"],
    )
    with pytest.raises(NotFoundError, match="nothing to remove"):
        store.remove_model("org/tuned")
