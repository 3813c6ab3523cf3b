"""Chunk codecs: how a chunk's raw bytes are stored (``raw``, ``zstd``, ``zstd-bytegroup``).

``zstd-bytegroup`` is for 16-bit floats (bfloat16, float16). The high byte of such a value
(sign and most of the exponent) is highly repetitive across a tensor while the low byte
(mantissa) is close to noise; interleaved, zstd sees neither pattern well. Splitting every
value's low and high bytes into two streams (the idea ZipNN uses) lets zstd squeeze the
exponent stream hard and leave the mantissa stream alone.

Thread safety: ``zstandard.ZstdCompressor`` and ``ZstdDecompressor`` objects must not be shared
between threads, so every codec call makes its own (they are cheap next to a 16 MiB chunk) and
the codec objects themselves hold no state: one codec may be used from many threads at once.
zstd releases the GIL while it works, so a loader decompressing chunks on a thread pool scales
with cores.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ember_core import InvalidRequestError, ModelFormatError

if TYPE_CHECKING:
    # numpy is imported where bytegroup chunks are split or joined, and zstandard where
    # chunks are compressed or decompressed, not with this module: a new worker's
    # readahead child that only checks local chunks never needs numpy (39 of the ~55 ms
    # that child spent importing, beside the worker's torch), and a worker loading
    # decoded chunks from a cache tier needs neither (zstandard: ~5 ms of its imports).
    import numpy as np

__all__ = [
    "CODEC_NAMES",
    "MIN_SAVING_FRACTION",
    "Codec",
    "RawCodec",
    "ZstdBytegroupCodec",
    "ZstdCodec",
    "choose_codec",
    "codec_for",
]

#: A chunk is stored compressed only if that saves at least this fraction of its raw size;
#: below it, decompression time costs more on load than the bytes saved on fetch.
MIN_SAVING_FRACTION = 0.05

_Buffer = bytes | bytearray | memoryview
#: ``scratch(n)``: ``n`` writable bytes a codec may decode through, valid for one call.
Scratch = Callable[[int], memoryview]


@runtime_checkable
class Codec(Protocol):
    """Turns a chunk's raw bytes into stored bytes and back. Stateless and thread-safe."""

    @property
    def name(self) -> str: ...

    def encode(self, raw: _Buffer, *, level: int = 3) -> bytes:
        """Return the stored form of ``raw``."""
        ...

    def decode(self, stored: _Buffer, *, raw_size: int) -> bytes:
        """Return the raw bytes; raise ModelFormatError unless they are exactly ``raw_size``."""
        ...

    def decode_into(
        self, stored: _Buffer, out: memoryview, *, scratch: Scratch | None = None
    ) -> None:
        """Write the raw bytes into ``out``, which must be exactly the raw size, writable.
        ``scratch(n)``: ``n`` bytes of writable memory for this call, for a codec that
        decodes through a buffer of its own (``LoadScratch``); None: it allocates one."""
        ...


def _check_level(level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise InvalidRequestError(
            f"zstd level must be an integer from 1 to 22, got {level!r}", param="level"
        )


def _byte_view(buf: _Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _writable_out(out: memoryview) -> memoryview:
    view = _byte_view(out)
    if view.readonly:
        raise InvalidRequestError("decode_into needs a writable output buffer", param="out")
    if not view.contiguous:
        raise InvalidRequestError("decode_into needs a contiguous output buffer", param="out")
    return view


def _check_raw_size(raw_size: int) -> None:
    if isinstance(raw_size, bool) or not isinstance(raw_size, int) or raw_size < 0:
        raise InvalidRequestError(
            f"raw_size must be a non-negative integer, got {raw_size!r}", param="raw_size"
        )


def _zstd_compress(raw: _Buffer, level: int) -> bytes:
    # write_content_size (the default) records the raw size in the frame header, which lets
    # decode check the expected size before doing any work.
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress(raw)


def _zstd_decompress_into(stored: _Buffer, out: memoryview, codec: str) -> None:
    """Decompress one zstd frame straight into ``out`` (no intermediate bytes object)."""
    import zstandard

    expected = len(out)
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise ModelFormatError(
            f"{codec} chunk is not a valid zstd frame ({exc}); the stored chunk is corrupt, "
            "fetch it again from another tier"
        ) from exc
    if declared not in (-1, expected):
        raise ModelFormatError(
            f"{codec} chunk decompresses to {declared} bytes but {expected} were expected; "
            "the manifest and the chunk disagree, re-import the model"
        )
    written = 0
    try:
        # stream_reader.readinto decompresses directly into the caller's buffer (the C
        # backend hands the buffer to ZSTD_decompressStream), with the GIL released.
        with zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False) as r:
            while written < expected:
                n = r.readinto(out[written:])
                if n == 0:
                    break
                written += n
            extra = r.read(1)
    except zstandard.ZstdError as exc:
        raise ModelFormatError(
            f"{codec} chunk failed to decompress ({exc}); the stored chunk is corrupt, "
            "fetch it again from another tier"
        ) from exc
    if written != expected or extra:
        got = f"{written}" if not extra else f"more than {expected}"
        raise ModelFormatError(
            f"{codec} chunk decompressed to {got} bytes but {expected} were expected; "
            "the stored chunk is truncated or corrupt, fetch it again from another tier"
        )


class RawCodec:
    """Stored bytes are the raw bytes."""

    name = "raw"

    def encode(self, raw: _Buffer, *, level: int = 3) -> bytes:
        return bytes(raw)

    def decode(self, stored: _Buffer, *, raw_size: int) -> bytes:
        _check_raw_size(raw_size)
        if len(_byte_view(stored)) != raw_size:
            raise ModelFormatError(
                f"raw chunk holds {len(_byte_view(stored))} bytes but {raw_size} were expected; "
                "the stored chunk is truncated or corrupt, fetch it again from another tier"
            )
        return bytes(stored)

    def decode_into(
        self, stored: _Buffer, out: memoryview, *, scratch: Scratch | None = None
    ) -> None:
        dst = _writable_out(out)
        src = _byte_view(stored)
        if len(src) != len(dst):
            raise ModelFormatError(
                f"raw chunk holds {len(src)} bytes but {len(dst)} were expected; "
                "the stored chunk is truncated or corrupt, fetch it again from another tier"
            )
        dst[:] = src


class ZstdCodec:
    """One zstd frame over the raw bytes."""

    name = "zstd"

    def encode(self, raw: _Buffer, *, level: int = 3) -> bytes:
        _check_level(level)
        return _zstd_compress(raw, level)

    def decode(self, stored: _Buffer, *, raw_size: int) -> bytes:
        _check_raw_size(raw_size)
        out = bytearray(raw_size)
        self.decode_into(stored, memoryview(out))
        return bytes(out)

    def decode_into(
        self, stored: _Buffer, out: memoryview, *, scratch: Scratch | None = None
    ) -> None:
        _zstd_decompress_into(stored, _writable_out(out), self.name)


class ZstdBytegroupCodec:
    """16-bit values as two byte streams: the high bytes (sign and exponent) zstd-compressed,
    the low bytes (mostly mantissa, close to noise) compressed only if that pays.

    Stored layout: ``b"EBG2"``, the high frame's length (u32 little-endian), the high frame,
    then the low stream, raw (exactly half the raw size) or one zstd frame (shorter). Keeping
    the streams apart means decoding runs zstd over the half that compresses and copies the
    other: twice as fast as one frame over both, for the same size. Chunks written by the
    first layout (one zstd frame over low-then-high) still decode.
    """

    name = "zstd-bytegroup"

    def _pairs(self, buf: _Buffer, what: str) -> np.ndarray:
        import numpy as np

        view = _byte_view(buf)
        if len(view) % 2:
            raise InvalidRequestError(
                f"zstd-bytegroup works on 16-bit values but the {what} is {len(view)} bytes "
                "(odd); use the 'zstd' codec for data that is not 16-bit",
                param="raw",
            )
        return np.frombuffer(view, dtype=np.uint8).reshape(-1, 2)

    def encode(self, raw: _Buffer, *, level: int = 3) -> bytes:
        import numpy as np

        _check_level(level)
        pairs = self._pairs(raw, "input")
        low = np.ascontiguousarray(pairs[:, 0])
        high_frame = _zstd_compress(np.ascontiguousarray(pairs[:, 1]).data, level)
        low_frame = _zstd_compress(low.data, level)
        compressed = len(low_frame) <= len(low) * (1 - MIN_SAVING_FRACTION)
        low_part = low_frame if compressed else low.data
        return b"".join(
            (_BYTEGROUP_MAGIC, struct.pack("<I", len(high_frame)), high_frame, low_part)
        )

    def decode(self, stored: _Buffer, *, raw_size: int) -> bytes:
        _check_raw_size(raw_size)
        out = bytearray(raw_size)
        self.decode_into(stored, memoryview(out))
        return bytes(out)

    def decode_into(
        self, stored: _Buffer, out: memoryview, *, scratch: Scratch | None = None
    ) -> None:
        dst = _writable_out(out)
        src = _byte_view(stored)
        if len(dst) % 2:
            raise ModelFormatError(
                f"zstd-bytegroup chunk must have an even raw size, the manifest says {len(dst)}; "
                "re-import the model"
            )
        half = len(dst) // 2
        if bytes(src[:4]) != _BYTEGROUP_MAGIC:
            self._decode_one_frame(src, dst, half, scratch)
            return
        if len(src) < 8:
            raise ModelFormatError(_CORRUPT.format(self.name))
        (high_len,) = struct.unpack("<I", src[4:8])
        high_frame, low_part = src[8 : 8 + high_len], src[8 + high_len :]
        if len(high_frame) != high_len:
            raise ModelFormatError(_CORRUPT.format(self.name))
        if len(low_part) > half:
            raise ModelFormatError(
                f"{self.name} chunk's low-byte stream is {len(low_part)} bytes but at most "
                f"{half} were expected; the stored chunk is truncated or corrupt, or the "
                "manifest's raw size is wrong: fetch it again from another tier"
            )
        raw_low = len(low_part) == half
        space = _scratch_array(scratch, half if raw_low else 2 * half)
        high = space[:half]
        _zstd_decompress_into(high_frame, high.data, self.name)
        if raw_low:
            import numpy as np

            low = np.frombuffer(low_part, dtype=np.uint8)
        else:
            low = space[half:]
            _zstd_decompress_into(low_part, low.data, self.name)
        _interleave(low, high, dst)

    def _decode_one_frame(
        self, src: memoryview, dst: memoryview, half: int, scratch: Scratch | None
    ) -> None:
        if not len(dst):
            _zstd_decompress_into(src, dst, self.name)  # still checks the frame
            return
        grouped = _scratch_array(scratch, len(dst))
        _zstd_decompress_into(src, grouped.data, self.name)
        _interleave(grouped[:half], grouped[half:], dst)


def _scratch_array(scratch: Scratch | None, nbytes: int) -> np.ndarray:
    import numpy as np

    if scratch is None:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(scratch(nbytes), dtype=np.uint8)


_BYTEGROUP_MAGIC = b"EBG2"
_CORRUPT = "{} chunk is truncated or corrupt; fetch it again from another tier"


def _interleave(low: np.ndarray, high: np.ndarray, dst: memoryview) -> None:
    """``dst`` = low[0] high[0] low[1] high[1] ..., computed as 16-bit words (little-endian)
    with one shift and one or: ~5 GB/s on one core here, against ~2.3 for torch.stack on one
    thread and ~3.5 for two strided numpy copies. It runs on the loader's threads, so it
    must not start a thread pool of its own."""
    import numpy as np

    if not len(dst):
        return
    words = np.frombuffer(dst, dtype=np.uint16)
    np.left_shift(high, 8, out=words, dtype=np.uint16)
    np.bitwise_or(words, low, out=words)


_CODECS: dict[str, type[RawCodec] | type[ZstdCodec] | type[ZstdBytegroupCodec]] = {
    RawCodec.name: RawCodec,
    ZstdCodec.name: ZstdCodec,
    ZstdBytegroupCodec.name: ZstdBytegroupCodec,
}

#: Every codec name a manifest may use.
CODEC_NAMES: frozenset[str] = frozenset(_CODECS)


def codec_for(name: str) -> Codec:
    """The codec called ``name``; ModelFormatError for a name this version does not know."""
    cls = _CODECS.get(name)
    if cls is None:
        raise ModelFormatError(
            f"unknown chunk codec {name!r}; known codecs: {', '.join(sorted(CODEC_NAMES))}. "
            "The model was probably written by a newer Ember: upgrade, or re-import it"
        )
    return cls()


def choose_codec(raw: _Buffer, *, dtype_bytes: int, level: int = 3) -> tuple[str, bytes]:
    """Encode one chunk the best way this store knows; return ``(codec name, stored bytes)``.

    16-bit data (``dtype_bytes == 2``) tries ``zstd-bytegroup``, anything else ``zstd``.
    Compression is kept only if it saves at least ``MIN_SAVING_FRACTION`` of the raw size;
    otherwise the chunk is stored ``raw`` so loading it costs no decompression at all.
    """
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise InvalidRequestError(
            f"dtype_bytes must be a positive integer, got {dtype_bytes!r}", param="dtype_bytes"
        )
    _check_level(level)
    view = _byte_view(raw)
    size = len(view)
    if size == 0:
        return RawCodec.name, b""
    codec: Codec
    codec = ZstdBytegroupCodec() if dtype_bytes == 2 and size % 2 == 0 else ZstdCodec()
    stored = codec.encode(view, level=level)
    if len(stored) <= size * (1.0 - MIN_SAVING_FRACTION):
        return codec.name, stored
    return RawCodec.name, bytes(view)
