"""A tokenizer backend that decodes from a table and leaves the rest to the real one.

A worker given prompts as ids needs, on its way to READY, only decoding and the ids of
its special tokens: ``TableBackend`` answers those from ``ember_weights_store``'s decode
table (read in ~1 ms, where parsing the decode-only ``tokenizer.json`` took ~20 ms of
Rust holding the GIL) and hands anything else (encoding, a vocabulary lookup of an
ordinary token) to the full ``tokenizers.Tokenizer``, parsed on first need: the same one
``Tokenizer`` encodes with.

Example::

    backend = TableBackend.from_dir(model_dir, full=lambda: parse(model_dir))
    backend.decode([9690, 198], skip_special_tokens=True)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember_weights_store.decode_table import DECODE_TABLE_FILE, DecodeTable

if TYPE_CHECKING:
    import tokenizers

__all__ = ["TableBackend", "has_id"]


@dataclass(frozen=True)
class _Added:
    """What ``tokenizers.AddedToken`` tells ``Tokenizer``: whether it is special."""

    content: str
    special: bool


class _Once:
    """``make()``'s result, made on the first call from any thread and kept."""

    def __init__(self, make: Callable[[], tokenizers.Tokenizer]) -> None:
        self._make = make
        self._made: tokenizers.Tokenizer | None = None
        self._lock = threading.Lock()

    def __call__(self) -> tokenizers.Tokenizer:
        if self._made is None:
            with self._lock:
                if self._made is None:
                    self._made = self._make()
        return self._made


class TableBackend:
    """The slice of ``tokenizers.Tokenizer`` a decode-first ``Tokenizer`` uses."""

    def __init__(self, table: DecodeTable, *, full: Callable[[], tokenizers.Tokenizer]) -> None:
        self.table = table
        # The whole tokenizer, parsed on the first call and kept: ``Tokenizer`` encodes
        # with this same one.
        self.full = _Once(full)
        self._added_by_id = {i: text for text, i in table.added.items()}

    @classmethod
    def from_dir(
        cls, model_dir: Path, *, full: Callable[[], tokenizers.Tokenizer]
    ) -> TableBackend | None:
        """From the directory's decode table; None if it has no readable one."""
        try:
            table = DecodeTable.from_bytes((model_dir / DECODE_TABLE_FILE).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(table, full=full)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.table.decode(ids, skip_special_tokens=skip_special_tokens)

    def has(self, token_id: int) -> bool:
        return self.table.has(token_id)

    def token_to_id(self, token: str) -> int | None:
        found = self.table.added.get(token)
        return found if found is not None else self.full().token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if not self.table.has(token_id):
            return None
        added = self._added_by_id.get(token_id)
        return added if added is not None else self.full().id_to_token(token_id)

    def get_added_tokens_decoder(self) -> dict[int, _Added]:
        special = self.table.special_ids
        return {i: _Added(text, i in special) for i, text in self._added_by_id.items()}

    def __getattr__(self, name: str) -> Any:
        # Everything else (encode, get_vocab...) is the full tokenizer's; not the dunder
        # names copy and pickle probe for, nor anything before ``__init__`` has run.
        full = self.__dict__.get("full")
        if full is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(full(), name)


def has_id(backend: tokenizers.Tokenizer | TableBackend, token_id: int) -> bool:
    """Whether some token has this id, asked without reading the vocabulary out."""
    if isinstance(backend, TableBackend):
        return backend.has(token_id)
    return backend.id_to_token(token_id) is not None
