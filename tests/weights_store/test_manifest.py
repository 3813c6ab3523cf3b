"""Manifest: JSON round trip, every validation failure, model ids, chunk layout planning."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import pytest

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store.layout import chunk_ranges, plan_chunks
from ember_weights_store.manifest import (
    ALIGNMENT_BYTES,
    ChunkEntry,
    Manifest,
    TensorEntry,
    model_key,
    validate_model_id,
)

CHUNK = 4096
TENSORS = [
    ("model.layers.0.mlp.up_proj.weight", "bfloat16", (64, 96), 64 * 96 * 2),
    ("lm_head.weight", "bfloat16", (100, 7), 100 * 7 * 2),
    ("model.norm.weight", "float32", (33,), 33 * 4),
    ("model.embed_tokens.weight", "bfloat16", (5,), 10),
]


def _hash(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def _manifest(**overrides: Any) -> Manifest:
    tensors, sizes = plan_chunks(TENSORS, chunk_size_bytes=CHUNK)
    chunks = [
        ChunkEntry(_hash(i), "raw", size, size, dtype, off)
        for i, (dtype, off, size) in enumerate(
            (dtype, off, size)
            for dtype, total in sizes.items()
            for off, size in chunk_ranges(total, chunk_size_bytes=CHUNK)
        )
    ]
    args: dict[str, Any] = {
        "model_id": "HuggingFaceTB/SmolLM2-135M",
        "revision": "main",
        "architecture": {"model_type": "llama", "hidden_size": 576},
        "tokenizer_files": {"tokenizer.json": _hash(99)},
        "tensors": tuple(tensors),
        "chunks": tuple(chunks),
        "chunk_size_bytes": CHUNK,
    }
    args.update(overrides)
    return Manifest(**args)


def _edit(fn: Any) -> str:
    data = json.loads(_manifest().to_json())
    fn(data)
    return json.dumps(data)


def test_json_round_trip_is_equal_and_deterministic() -> None:
    m = _manifest()
    text = m.to_json()
    back = Manifest.from_json(text)
    assert back == m
    assert back.to_json() == text
    assert json.loads(text)["schema_version"] == 1
    assert m.buffer_sizes == {"bfloat16": 13760, "float32": 192}
    assert m.tensor("model.norm.weight").shape == (33,)


def test_order_of_entries_does_not_matter() -> None:
    m = _manifest()
    shuffled = _manifest(tensors=m.tensors[::-1], chunks=m.chunks[::-1])
    assert shuffled == m and shuffled.to_json() == m.to_json()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"schema_version": 1, "model_id": "a", "tens', "not valid JSON"),
        ("[]", "top level"),
        (_edit(lambda d: d.update(schema_version=2)), "schema_version 2 is not supported"),
        (_edit(lambda d: d.pop("chunks")), "missing chunks"),
        (_edit(lambda d: d["tensors"][0].pop("shape")), r"tensors\[0\] is missing shape"),
        (_edit(lambda d: d["chunks"].pop(1)), "gap"),
        (_edit(lambda d: d["chunks"][1].update(offset_bytes=4032)), "overlap"),
        (_edit(lambda d: d["chunks"][0].update(codec="lz4")), "unknown codec 'lz4'"),
        (_edit(lambda d: d["chunks"][0].update(hash="md5:00")), "must be 'sha256:'"),
        (_edit(lambda d: d["chunks"][0].update(raw_size=-1)), "raw_size must be an integer"),
        (_edit(lambda d: d["chunks"][0].update(raw_size=True)), "raw_size must be an integer"),
        (_edit(lambda d: d["chunks"].pop()), "chunks cover only"),
        (_edit(lambda d: d["tensors"][0].update(offset_bytes=13696)), "chunks cover only"),
        (_edit(lambda d: d["tensors"][0].update(offset_bytes=1)), "aligned"),
        (_edit(lambda d: d["tensors"][0].update(dtype="complex32")), "not a known dtype"),
        (_edit(lambda d: d["tensors"][0].update(size_bytes=2)), "needs"),
        (_edit(lambda d: d["tensors"][1].update(offset_bytes=0)), "overlap"),
        (_edit(lambda d: d.update(model_id="../etc")), "invalid model id"),
        (_edit(lambda d: d.update(revision="a/../b")), "revision"),
        (_edit(lambda d: d.update(chunk_size_bytes=1000)), "chunk_size_bytes"),
        (_edit(lambda d: d.update(tokenizer_files={"../x": _hash(1)})), "plain file name"),
    ],
)
def test_invalid_manifest_is_a_model_format_error(text: str, match: str) -> None:
    with pytest.raises(ModelFormatError, match=match) as info:
        Manifest.from_json(text)
    assert "invalid manifest" in info.value.message


def test_chunk_larger_than_chunk_size_is_rejected() -> None:
    with pytest.raises(ModelFormatError, match="more than chunk_size_bytes"):
        _manifest(
            chunk_size_bytes=4096, chunks=(ChunkEntry(_hash(0), "zstd", 8192, 10, "int8", 0),)
        )


@pytest.mark.parametrize("good", ["smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "a.b_c-1"])
def test_valid_model_ids(good: str) -> None:
    assert validate_model_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/../b", "/abs", "a\\b", "..", ".hidden", "a/b/c", "a--b", "a/", "x" * 201]
)
def test_bad_model_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid model id"):
        validate_model_id(bad)
    with pytest.raises(InvalidRequestError):
        model_key(bad)


def test_model_key_is_a_single_safe_component() -> None:
    assert model_key("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert model_key("smollm2-135m") == "smollm2-135m"


def test_plan_chunks_layout() -> None:
    tensors, sizes = plan_chunks(TENSORS, chunk_size_bytes=CHUNK)
    assert [t.name for t in tensors] == sorted(name for name, *_ in TENSORS)
    for dtype, size in sizes.items():
        mine = sorted((t for t in tensors if t.dtype == dtype), key=lambda t: t.offset_bytes)
        assert all(t.offset_bytes % ALIGNMENT_BYTES == 0 for t in mine)
        assert all(a.end_bytes <= b.offset_bytes for a, b in itertools.pairwise(mine))
        assert mine[0].offset_bytes == 0 and mine[-1].end_bytes <= size
        assert size % ALIGNMENT_BYTES == 0 and size - mine[-1].end_bytes < ALIGNMENT_BYTES
        ranges = chunk_ranges(size, chunk_size_bytes=CHUNK)
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == size
        assert all(off + n == nxt for (off, n), (nxt, _) in itertools.pairwise(ranges))
        assert all(n == CHUNK for _, n in ranges[:-1]) and 0 < ranges[-1][1] <= CHUNK


def test_chunk_ranges_edges() -> None:
    assert chunk_ranges(0, chunk_size_bytes=CHUNK) == []
    assert chunk_ranges(CHUNK, chunk_size_bytes=CHUNK) == [(0, CHUNK)]
    assert chunk_ranges(CHUNK + 64, chunk_size_bytes=CHUNK) == [(0, CHUNK), (CHUNK, 64)]


def test_plan_chunks_rejects_bad_input() -> None:
    for size in (2048, 4096 + 1, 0):
        with pytest.raises(InvalidRequestError, match="chunk_size_bytes"):
            plan_chunks(TENSORS, chunk_size_bytes=size)
    with pytest.raises(InvalidRequestError, match="does not match"):
        plan_chunks([("w", "bfloat16", (4,), 7)])
    with pytest.raises(InvalidRequestError, match="does not support"):
        plan_chunks([("w", "complex64", (4,), 32)])
    with pytest.raises(InvalidRequestError, match="twice"):
        plan_chunks([("w", "int8", (4,), 4), ("w", "int8", (4,), 4)])


def test_tensor_entry_validates_at_construction() -> None:
    with pytest.raises(ModelFormatError, match="shape"):
        TensorEntry("w", "int8", [4], 0, 4)  # type: ignore[arg-type]
