"""Codecs: exact round trips, bytegroup pays off on bf16, the 5% rule, corrupt input fails."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store.codecs import CODEC_NAMES, choose_codec, codec_for


def _bf16_bytes(n: int, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    return t.view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def bf16() -> bytes:
    return _bf16_bytes(1 << 18)


@pytest.mark.parametrize("name", sorted(CODEC_NAMES))
@pytest.mark.parametrize("kind", ["bf16", "random", "empty"])
def test_round_trip(name: str, kind: str, bf16: bytes) -> None:
    raw = {"bf16": bf16, "random": os.urandom(1 << 16), "empty": b""}[kind]
    codec = codec_for(name)
    assert codec.name == name
    stored = codec.encode(raw)
    assert codec.decode(stored, raw_size=len(raw)) == raw
    out = bytearray(len(raw))
    codec.decode_into(stored, memoryview(out))
    assert bytes(out) == raw


def test_decode_into_numpy_buffer_slice(bf16: bytes) -> None:
    # The loader decodes straight into a slice of a preallocated flat buffer.
    codec = codec_for("zstd-bytegroup")
    flat = np.zeros(len(bf16) + 128, dtype=np.uint8)
    codec.decode_into(codec.encode(bf16), memoryview(flat)[64 : 64 + len(bf16)])
    assert flat[64 : 64 + len(bf16)].tobytes() == bf16
    assert not flat[:64].any() and not flat[64 + len(bf16) :].any()


def test_bytegroup_beats_plain_zstd_on_bf16(bf16: bytes) -> None:
    zstd = len(codec_for("zstd").encode(bf16))
    grouped = len(codec_for("zstd-bytegroup").encode(bf16))
    # Measured on randn*0.02 bf16: zstd ~0.78 of raw, bytegroup ~0.70.
    assert grouped < 0.95 * zstd
    assert grouped < 0.75 * len(bf16)


def test_choose_codec_picks_bytegroup_for_16_bit(bf16: bytes) -> None:
    name, stored = choose_codec(bf16, dtype_bytes=2)
    assert name == "zstd-bytegroup"
    assert codec_for(name).decode(stored, raw_size=len(bf16)) == bf16


def test_choose_codec_uses_zstd_for_other_dtypes() -> None:
    raw = np.arange(1 << 14, dtype=np.int32).tobytes()
    name, stored = choose_codec(raw, dtype_bytes=4)
    assert name == "zstd" and len(stored) < len(raw)


def test_choose_codec_keeps_random_bytes_raw() -> None:
    raw = os.urandom(1 << 16)
    for dtype_bytes in (1, 2, 4):
        assert choose_codec(raw, dtype_bytes=dtype_bytes) == ("raw", raw)


def test_choose_codec_rejects_bad_options() -> None:
    with pytest.raises(InvalidRequestError, match="dtype_bytes"):
        choose_codec(b"ab", dtype_bytes=0)
    with pytest.raises(InvalidRequestError, match="level"):
        choose_codec(b"ab", dtype_bytes=2, level=99)


@pytest.mark.parametrize("name", sorted(CODEC_NAMES))
def test_wrong_raw_size_is_an_error(name: str, bf16: bytes) -> None:
    codec = codec_for(name)
    stored = codec.encode(bf16[:4096])
    for raw_size in (4094, 4098):
        with pytest.raises(ModelFormatError, match="expected"):
            codec.decode(stored, raw_size=raw_size)


@pytest.mark.parametrize("name", ["zstd", "zstd-bytegroup"])
def test_corrupt_or_truncated_frame_is_an_error(name: str, bf16: bytes) -> None:
    codec = codec_for(name)
    stored = codec.encode(bf16[:8192])
    with pytest.raises(ModelFormatError, match="fetch it again"):
        codec.decode(stored[: len(stored) // 2], raw_size=8192)
    with pytest.raises(ModelFormatError, match="corrupt"):
        codec.decode(b"not a zstd frame at all", raw_size=8192)


def test_bytegroup_rejects_odd_length() -> None:
    with pytest.raises(InvalidRequestError, match="odd"):
        codec_for("zstd-bytegroup").encode(b"abc")


def test_unknown_codec_lists_known_ones() -> None:
    with pytest.raises(ModelFormatError, match="known codecs: raw, zstd, zstd-bytegroup"):
        codec_for("lz4")


def test_decode_into_needs_writable_buffer(bf16: bytes) -> None:
    codec = codec_for("zstd")
    with pytest.raises(InvalidRequestError, match="writable"):
        codec.decode_into(codec.encode(bf16[:64]), memoryview(bytes(64)))


def test_bytegroup_reads_the_first_layout_one_frame_over_both_streams(bf16: bytes) -> None:
    import numpy as np
    import zstandard

    raw = bf16[:8192]
    pairs = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2)
    legacy = zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(pairs.T).tobytes())
    assert codec_for("zstd-bytegroup").decode(legacy, raw_size=len(raw)) == raw


def test_bytegroup_keeps_an_incompressible_low_stream_raw(bf16: bytes) -> None:
    import os

    noisy_low = bytes(b for pair in zip(os.urandom(4096), bytes(4096), strict=True) for b in pair)
    stored = codec_for("zstd-bytegroup").encode(noisy_low)
    # The high bytes (all zero) shrink to a tiny frame; the random low bytes stay as they are.
    assert len(noisy_low) // 2 <= len(stored) < len(noisy_low) // 2 + 64
    assert codec_for("zstd-bytegroup").decode(stored, raw_size=len(noisy_low)) == noisy_low


@pytest.mark.parametrize(
    ("layout", "scratch_halves"),
    [("two streams, low kept raw", 1), ("two streams", 2), ("one frame", 2)],
)
def test_bytegroup_decodes_through_the_scratch_it_is_given(
    bf16: bytes, layout: str, scratch_halves: int
) -> None:
    import zstandard

    raw = bf16[:8192]  # noisy low bytes: stored raw, read in place
    if layout == "two streams":  # 3 mantissa bits: the low bytes compress too
        raw = (torch.randn(4096) * 8).round().bfloat16().div(8).view(torch.uint8).numpy().tobytes()
    if layout == "one frame":
        pairs = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2)
        stored = zstandard.ZstdCompressor().compress(np.ascontiguousarray(pairs.T).tobytes())
    else:
        stored = codec_for("zstd-bytegroup").encode(raw)
    space = bytearray(len(raw) + 100)
    asked: list[int] = []

    def scratch(n: int) -> memoryview:
        asked.append(n)
        return memoryview(space)[:n]

    out = bytearray(len(raw))
    codec_for("zstd-bytegroup").decode_into(stored, memoryview(out), scratch=scratch)
    assert bytes(out) == raw
    assert asked == [len(raw) // 2 * scratch_halves]  # decoded there, nothing allocated
    assert any(space[: asked[0]])
