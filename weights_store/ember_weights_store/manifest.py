"""The manifest: everything needed to rebuild a model from content-addressed chunks.

A model's tensors are laid out in one flat buffer per dtype (each tensor 64-byte aligned so
views into the buffer are aligned for any kernel), and every buffer is cut into fixed-size
chunks (the last one shorter). A chunk is named by the SHA-256 of its *raw* bytes, so the same
bytes are stored once whichever model, revision or codec produced them.

Tokenizer files are not inlined: ``tokenizer_files`` maps each file name to the
``sha256:<hex>`` of its bytes, and the store keeps the file as a blob under that hash, beside
the chunks. A fine-tune that shares its base's tokenizer therefore stores it once, and the
manifest stays small enough to fetch and parse first on every cold start.

The JSON form is versioned (``schema_version``) and validated completely on read: a truncated
or hand-edited manifest fails with a ModelFormatError that says which field is wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store.codecs import CODEC_NAMES
from ember_weights_store.digests import CHECKSUM_RE, FastChecksum, sha256_key

__all__ = [
    "ALIGNMENT_BYTES",
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DTYPE_SIZES",
    "MIN_CHUNK_SIZE_BYTES",
    "SCHEMA_VERSION",
    "ChunkEntry",
    "Manifest",
    "TensorEntry",
    "model_key",
    "validate_model_id",
]

SCHEMA_VERSION = 1
ALIGNMENT_BYTES = 64
DEFAULT_CHUNK_SIZE_BYTES = 16 * 1024 * 1024
MIN_CHUNK_SIZE_BYTES = 4 * 1024

#: Bytes per element of every dtype a manifest may hold (names as torch spells them).
DTYPE_SIZES: Mapping[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "float32": 4,
    "int64": 8,
    "float64": 8,
}

_ID_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_MODEL_ID_LEN = 200
_TENSOR_FIELDS = ("name", "dtype", "shape", "offset_bytes", "size_bytes")
_CHUNK_FIELDS = ("hash", "codec", "raw_size", "stored_size", "dtype", "offset_bytes")


def _bad(msg: str) -> ModelFormatError:
    return ModelFormatError(f"invalid manifest: {msg}; re-import the model to rebuild it")


def _check_int(value: object, what: str, *, minimum: int = 0) -> int:
    # bool is an int subclass; true/false in a size field is a corrupt manifest, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{what} must be a non-empty string, got {value!r}")
    return value


def _check_dtype(value: object, what: str) -> str:
    if value not in DTYPE_SIZES:
        raise _bad(f"{what} {value!r} is not a known dtype (known: {', '.join(DTYPE_SIZES)})")
    return str(value)


def validate_model_id(model_id: str) -> str:
    """Return ``model_id`` if it is ``name`` or ``org/name``; else raise InvalidRequestError.

    Each part uses letters, digits, '.', '_' and '-', starts with a letter or digit, and holds
    no '..' or '--' (the same rules as the Hugging Face Hub; '--' is reserved by model_key).
    """
    if not isinstance(model_id, str):
        raise InvalidRequestError(f"model id must be a string, got {model_id!r}", param="model")
    parts = model_id.split("/")
    ok = (
        0 < len(model_id) <= _MAX_MODEL_ID_LEN
        and len(parts) <= 2
        and all(_ID_PART_RE.fullmatch(p) and ".." not in p and "--" not in p for p in parts)
    )
    if not ok:
        raise InvalidRequestError(
            f"invalid model id {model_id!r}: use 'name' or 'org/name', each part made of "
            "letters, digits, '.', '_' and '-', starting with a letter or digit, without '..' "
            f"or '--', at most {_MAX_MODEL_ID_LEN} characters (no other '/', no '\\', no "
            "absolute paths)",
            param="model",
        )
    return model_id


def model_key(model_id: str) -> str:
    """A storage key (file or object name) for ``model_id``: ``org/name`` becomes ``org--name``.

    One-to-one, because valid ids never contain '--'; safe as a single path component.
    """
    return validate_model_id(model_id).replace("/", "--")


def _validate_revision(revision: object) -> str:
    if not isinstance(revision, str) or not _REVISION_RE.fullmatch(revision) or ".." in revision:
        raise _bad(
            f"revision {revision!r} must be 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '..'"
        )
    return revision


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: a view of ``size_bytes`` at ``offset_bytes`` in its dtype's flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset_bytes: int
    size_bytes: int

    def __post_init__(self) -> None:
        what = f"tensor {self.name!r}"
        _check_str(self.name, "tensor name")
        _check_dtype(self.dtype, f"{what} dtype")
        if not isinstance(self.shape, tuple):
            raise _bad(f"{what} shape must be a tuple of integers, got {self.shape!r}")
        for dim in self.shape:
            _check_int(dim, f"{what} shape dimension")
        _check_int(self.offset_bytes, f"{what} offset_bytes")
        _check_int(self.size_bytes, f"{what} size_bytes")
        expected = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if self.size_bytes != expected:
            raise _bad(
                f"{what} has size_bytes {self.size_bytes} but shape {list(self.shape)} of "
                f"{self.dtype} needs {expected}"
            )
        if self.offset_bytes % ALIGNMENT_BYTES:
            raise _bad(f"{what} offset {self.offset_bytes} is not {ALIGNMENT_BYTES}-byte aligned")

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.size_bytes


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk: ``raw_size`` bytes at ``offset_bytes`` of the ``dtype`` flat buffer."""

    hash: str
    codec: str
    raw_size: int
    stored_size: int
    dtype: str
    offset_bytes: int
    #: ``xxh3_128:<hex>`` of the raw bytes, checked on every load (see ``digests``). Empty in
    #: manifests written before it existed: those chunks are checked against ``hash``.
    checksum: str = ""

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` are this chunk's raw bytes: against ``checksum`` (fast), or
        the content hash where the manifest has no checksum."""
        if self.checksum:
            fast = FastChecksum()
            fast.update(data)
            return fast.hexdigest() == self.checksum
        return sha256_key(data) == self.hash

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HASH_RE.fullmatch(self.hash):
            raise _bad(f"chunk hash {self.hash!r} must be 'sha256:' and 64 lowercase hex digits")
        what = f"chunk {self.hash[:19]}…"
        if self.codec not in CODEC_NAMES:
            raise _bad(
                f"{what} uses unknown codec {self.codec!r} "
                f"(known: {', '.join(sorted(CODEC_NAMES))})"
            )
        _check_int(self.raw_size, f"{what} raw_size", minimum=1)
        _check_int(self.stored_size, f"{what} stored_size", minimum=1)
        _check_dtype(self.dtype, f"{what} dtype")
        _check_int(self.offset_bytes, f"{what} offset_bytes")
        if self.codec == "raw" and self.stored_size != self.raw_size:
            raise _bad(f"{what} is stored raw but stored_size {self.stored_size} != raw_size")
        if self.checksum and (
            not isinstance(self.checksum, str) or not CHECKSUM_RE.fullmatch(self.checksum)
        ):
            raise _bad(f"{what} checksum {self.checksum!r} must be 'xxh3_128:' and 32 hex digits")

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.raw_size


@dataclass(frozen=True)
class Manifest:
    """A stored model. Tensors are kept sorted by name, chunks by (dtype, offset).

    ``architecture`` is the Hugging Face config.json; ``tokenizer_files`` maps file name to the
    ``sha256:<hex>`` of its bytes (the store holds the file as a blob under that hash). Treat
    both dicts as read-only.
    """

    model_id: str
    revision: str
    architecture: dict[str, Any]
    tokenizer_files: dict[str, str]
    tensors: tuple[TensorEntry, ...]
    chunks: tuple[ChunkEntry, ...]
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    buffer_sizes: dict[str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            validate_model_id(self.model_id)
        except InvalidRequestError as exc:
            raise _bad(exc.message) from exc
        _validate_revision(self.revision)
        if not isinstance(self.architecture, dict):
            raise _bad("architecture must be an object (the model's config.json)")
        if not isinstance(self.tokenizer_files, dict):
            raise _bad("tokenizer_files must be an object of file name -> 'sha256:<hex>'")
        for fname, digest in self.tokenizer_files.items():
            if not isinstance(fname, str) or not _ID_PART_RE.fullmatch(fname) or ".." in fname:
                raise _bad(f"tokenizer file name {fname!r} must be a plain file name")
            if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
                raise _bad(f"tokenizer file {fname!r} hash {digest!r} must be 'sha256:<64 hex>'")
        check_chunk_size(self.chunk_size_bytes, _bad)
        if not all(isinstance(t, TensorEntry) for t in self.tensors):
            raise _bad("tensors must be TensorEntry objects")
        if not all(isinstance(c, ChunkEntry) for c in self.chunks):
            raise _bad("chunks must be ChunkEntry objects")
        # Canonical order, so equal models compare equal and serialize to identical JSON.
        tensors = tuple(sorted(self.tensors, key=lambda t: t.name))
        chunks = tuple(sorted(self.chunks, key=lambda c: (c.dtype, c.offset_bytes)))
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "chunks", chunks)
        object.__setattr__(self, "buffer_sizes", self._check_layout())

    @property
    def raw_size_bytes(self) -> int:
        """The model's decoded bytes: every chunk's raw size, the buffers' total."""
        return sum(self.buffer_sizes.values())

    def _check_layout(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for c in self.chunks:
            end = sizes.get(c.dtype, 0)
            if c.offset_bytes != end:
                kind = "gap" if c.offset_bytes > end else "overlap"
                raise _bad(
                    f"chunks of the {c.dtype} buffer have a {kind}: a chunk starts at "
                    f"{c.offset_bytes} but the previous one ends at {end}"
                )
            if c.raw_size > self.chunk_size_bytes:
                raise _bad(
                    f"chunk at {c.dtype}+{c.offset_bytes} holds {c.raw_size} bytes, more than "
                    f"chunk_size_bytes {self.chunk_size_bytes}"
                )
            sizes[c.dtype] = c.end_bytes
        names: set[str] = set()
        last_end: dict[str, tuple[int, str]] = {}
        for t in sorted(self.tensors, key=lambda t: (t.dtype, t.offset_bytes)):
            if t.name in names:
                raise _bad(f"tensor {t.name!r} appears twice")
            names.add(t.name)
            size = sizes.get(t.dtype, 0)
            if t.end_bytes > size:
                raise _bad(
                    f"tensor {t.name!r} spans bytes {t.offset_bytes}-{t.end_bytes} of the "
                    f"{t.dtype} buffer, but its chunks cover only {size} bytes"
                )
            prev_end, prev_name = last_end.get(t.dtype, (0, ""))
            if t.offset_bytes < prev_end:
                raise _bad(f"tensors {prev_name!r} and {t.name!r} overlap in the {t.dtype} buffer")
            if t.size_bytes:
                last_end[t.dtype] = (t.end_bytes, t.name)
        return sizes

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model_id": self.model_id,
            "revision": self.revision,
            "architecture": self.architecture,
            "tokenizer_files": self.tokenizer_files,
            "chunk_size_bytes": self.chunk_size_bytes,
            "tensors": [{**asdict(t), "shape": list(t.shape)} for t in self.tensors],
            "chunks": [asdict(c) for c in self.chunks],
        }

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, canonical entry order, no insignificant spaces."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and fully validate a manifest; ModelFormatError says what is wrong."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"not valid JSON ({exc}); the file is truncated or corrupt") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        if not isinstance(data, dict):
            raise _bad("the top level must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise _bad(
                f"schema_version {version!r} is not supported (this Ember reads version "
                f"{SCHEMA_VERSION}); upgrade Ember or re-import the model"
            )
        top = ("model_id", "revision", "architecture", "tokenizer_files", "chunk_size_bytes")
        _require(data, (*top, "tensors", "chunks"), "manifest")
        tensors_raw, chunks_raw = data["tensors"], data["chunks"]
        if not isinstance(tensors_raw, list) or not isinstance(chunks_raw, list):
            raise _bad("tensors and chunks must be lists")
        tensors = []
        for i, t in enumerate(tensors_raw):
            _require(t, _TENSOR_FIELDS, f"tensors[{i}]")
            if not isinstance(t["shape"], list):
                raise _bad(f"tensors[{i}] shape must be a list of integers")
            tensors.append(
                TensorEntry(**{**{k: t[k] for k in _TENSOR_FIELDS}, "shape": tuple(t["shape"])})
            )
        chunks = []
        for i, c in enumerate(chunks_raw):
            _require(c, _CHUNK_FIELDS, f"chunks[{i}]")
            chunks.append(
                ChunkEntry(**{k: c[k] for k in _CHUNK_FIELDS}, checksum=c.get("checksum", ""))
            )
        return cls(**{k: data[k] for k in top}, tensors=tuple(tensors), chunks=tuple(chunks))


def _require(obj: object, fields: Sequence[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise _bad(f"{what} must be an object")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise _bad(f"{what} is missing {', '.join(missing)}")


def check_chunk_size(size: object, err: Any) -> int:
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or size < MIN_CHUNK_SIZE_BYTES
        or size % ALIGNMENT_BYTES
    ):
        raise err(
            f"chunk_size_bytes must be an integer >= {MIN_CHUNK_SIZE_BYTES} and a multiple of "
            f"{ALIGNMENT_BYTES}, got {size!r}"
        )
    return size
