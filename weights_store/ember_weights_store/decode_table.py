"""A byte-level tokenizer's decoding as a table: each id's bytes, read in ~1 ms.

A worker's first token has to be decoded, so a new worker parsed the decode-only copy of
``tokenizer.json`` (``decode_file.py``) on its way to READY: ~20 ms of Rust holding the
GIL for SmolLM2's 49k-entry vocabulary, beside the loader's own work. For a byte-level
BPE (GPT-2's ``ByteLevel`` decoder: SmolLM2, Llama 3, Qwen2) decoding needs no tokenizer
at all: each id stands for fixed bytes (its vocabulary string through GPT-2's
byte-to-character map, or, where a string has characters outside that map, its UTF-8),
and a decode is those bytes joined and read as UTF-8 with U+FFFD for what does not
decode, exactly as ``tokenizers`` does (``tests/weights_store/test_decode_table.py``
compares every id and thousands of windows, split characters included).

The table is built once per tokenizer directory, by whoever writes or first reads it
(``tokenizer_files.tokenizer_dir``), and is ``DECODE_TABLE_FILE`` beside the others:
a header line of JSON (the ids a decode may skip as special, the added tokens, the ids
no token has), then the offsets (``count + 1`` little-endian u32) and the bytes. A
tokenizer with any other decoder gets an empty file, no table, and is parsed as before.

Example::

    table = DecodeTable.from_bytes(path.read_bytes())
    table.decode([9690, 198], skip_special_tokens=True)
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DECODE_TABLE_FILE", "DecodeTable", "build_decode_table"]

DECODE_TABLE_FILE = "tokenizer.decode.table"
_MAGIC = b"ember-decode-table-1\n"
_SKIP_NOTHING: frozenset[int] = frozenset()


def _char_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character each byte is written as ->
    that byte (printable Latin-1 as itself, the rest shifted past 255)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    chars = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def _byte_level(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "Sequence":
        inner = decoder.get("decoders")
        return isinstance(inner, list) and len(inner) == 1 and _byte_level(inner[0])
    return decoder.get("type") == "ByteLevel"


def build_decode_table(tokenizer_json: bytes) -> bytes | None:
    """The table for ``tokenizer_json`` (the decode-only copy serves: it has the whole
    vocabulary), or None when its decoding is not byte-level or the file is not what a
    ``tokenizers`` BPE or WordLevel model writes (it is then parsed as before)."""
    try:
        data = json.loads(tokenizer_json)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") not in ("BPE", "WordLevel"):
        return None
    vocab, added = model.get("vocab"), data.get("added_tokens") or []
    if not _byte_level(data.get("decoder")) or not isinstance(vocab, dict) or not vocab:
        return None
    try:
        strings: dict[int, str] = {int(i): str(t) for t, i in vocab.items()}
        for token in added:
            strings[int(token["id"])] = str(token["content"])
        specials = {str(t["content"]) for t in added if t.get("special")}
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    count = max(strings) + 1
    if min(strings) < 0 or count > 2 * len(strings) + 1024:  # not what tokenizers writes
        return None
    chars = _char_bytes()
    offsets, blob = array("I", [0]), bytearray()
    for i in range(count):
        text = strings.get(i)
        if text is not None:
            try:
                blob += bytes(chars[c] for c in text)
            except KeyError:  # outside the alphabet: ``tokenizers`` takes the UTF-8 as is
                blob += text.encode()
        offsets.append(len(blob))
    header = {
        "count": count,
        "special": sorted(i for i, t in strings.items() if t in specials),
        "added": {str(t["content"]): int(t["id"]) for t in added},
        "missing": [i for i in range(count) if i not in strings],
    }
    if sys.byteorder != "little":
        offsets.byteswap()
    return _MAGIC + json.dumps(header).encode() + b"\n" + offsets.tobytes() + bytes(blob)


class DecodeTable:
    """Decoding without a tokenizer: see the module's docstring."""

    def __init__(
        self,
        offsets: array[int],
        blob: bytes,
        *,
        special: Iterable[int],
        added: Mapping[str, int],
        missing: Iterable[int],
    ) -> None:
        self._offsets = offsets  # [count + 1]: id i's bytes are blob[offsets[i]:offsets[i+1]]
        self._blob = blob
        self.count = len(offsets) - 1
        self.special_ids = frozenset(special)
        self.added = dict(added)  # added token's text -> id
        self._missing = frozenset(missing)

    @classmethod
    def from_bytes(cls, data: bytes) -> DecodeTable:
        """Reads a table ``build_decode_table`` wrote; ``ValueError`` if it is not one."""
        if not data.startswith(_MAGIC):
            raise ValueError("not an Ember decode table")
        end = data.index(b"\n", len(_MAGIC))
        header = json.loads(data[len(_MAGIC) : end])
        count = int(header["count"])
        start = end + 1
        offsets = array("I")
        offsets.frombytes(data[start : start + 4 * (count + 1)])
        if sys.byteorder != "little":
            offsets.byteswap()
        blob = data[start + 4 * (count + 1) :]
        if len(offsets) != count + 1 or offsets[-1] != len(blob):
            raise ValueError("the decode table is truncated")
        return cls(
            offsets,
            blob,
            special=header["special"],
            added=header["added"],
            missing=header["missing"],
        )

    def has(self, token_id: int) -> bool:
        """Whether some token has this id."""
        return 0 <= token_id < self.count and token_id not in self._missing

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``, as ``tokenizers.Tokenizer.decode`` gives it: ids no token
        has decode to nothing, and so do special tokens when skipped."""
        offsets, blob, count = self._offsets, self._blob, self.count
        skip = self.special_ids if skip_special_tokens else _SKIP_NOTHING
        pieces = [
            blob[offsets[i] : offsets[i + 1]] for i in ids if 0 <= i < count and i not in skip
        ]
        return b"".join(pieces).decode("utf-8", "replace")
