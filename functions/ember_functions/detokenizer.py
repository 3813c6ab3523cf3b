"""Streaming decode: sampled ids to text deltas a client can show at once.

``IncrementalDetokenizer`` turns one request's ids into text deltas, and
``StopStringMatcher`` (``stop_strings.py``) cuts that text at the first stop string
without ever letting part of a stop reach the client. The engine chains them per
request: ``push`` each id, ``feed`` its delta; at the end ``flush`` the detokenizer,
``feed`` that, then ``flush`` the matcher.
"""

from __future__ import annotations

from collections.abc import Sequence

from ember_functions.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's sampled ids into text deltas, in O(1) work per token.

    Each step decodes only a short window: a few already-shown tokens for context (a
    SentencePiece ``▁`` becomes a space or nothing depending on what precedes it) plus
    the tokens not yet shown. ``prefix_offset``/``read_offset`` in vLLM and TGI, kept
    here as a window list and one index. Text is held back while it ends in U+FFFD: with
    byte-level BPE one character can span tokens, and the half-decoded bytes would show
    as a replacement character that the next token turns into the real one.

    Pass ``prompt_ids`` when the output continues the prompt's text (completions): the
    first token's leading space is then kept as the full text has it. Without them the
    deltas join to exactly ``tokenizer.decode(output_ids)``.
    """

    #: Prompt tokens kept as context; enough for every space-merging rule we know of.
    CONTEXT_TOKENS = 5
    #: Tokens held back at most. A UTF-8 character is at most 4 bytes, so a tail still
    #: undecodable after this many tokens is garbage that no later token will repair. The
    #: window is at most twice this long, which bounds the cost per token.
    MAX_PENDING_TOKENS = 16

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-self.CONTEXT_TOKENS :]) if prompt_ids else []
        # The context must start on a character boundary: cut mid-character, a byte-fallback
        # decoder turns the whole byte run into U+FFFD, including the output's first bytes.
        while context and self._decode(context).startswith(_REPLACEMENT_CHAR):
            del context[0]
        # Window ids before _read are already shown (or prompt); the rest are pending.
        self._window = context
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _advance(self) -> None:
        # The tokens just shown become the context for the next ones.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)

    def push(self, token_id: int) -> str:
        """Add one sampled id; return the text it makes visible (often "", never partial)."""
        self._window.append(token_id)
        text = self._decode(self._window)
        pending = len(self._window) - self._read
        grew = len(text) > len(self._prefix_text)
        if grew and (not text.endswith(_REPLACEMENT_CHAR) or pending >= self.MAX_PENDING_TOKENS):
            delta = text[len(self._prefix_text) :]
            self._advance()
            return delta
        if not grew and pending >= self.MAX_PENDING_TOKENS:
            # A long run of invisible tokens (skipped specials). They change no decode, so
            # drop them; the shown context stays, as a SentencePiece space needs something
            # visible before it to survive the decoder's strip of the leading space.
            del self._window[self._read :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back; call once when the request ends."""
        if self._read >= len(self._window):
            return ""
        text = self._decode(self._window)
        delta = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._advance()
        return delta
