"""A request in the engine: its sequence, the text it has produced, and when it ends.

The engine decides what runs and samples the tokens; each token then goes to its
``PreparedRequest``, which turns it into text (incrementally, so a multi-byte character
split across tokens comes out whole) and says whether it ended the request: EOS, a stop
string, ``max_tokens``, or the context window.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from ember_functions.detokenizer import IncrementalDetokenizer
from ember_functions.prompt import EncodedPrompt
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import FinishReason, RequestOutput
from ember_functions.sequence import Sequence as Seq
from ember_functions.stop_strings import StopStringMatcher
from ember_functions.tokenizer import Tokenizer

__all__ = ["PreparedRequest"]


@dataclass(eq=False)
class PreparedRequest:
    """A validated, tokenized request, ready for ``LLMEngine.enqueue``."""

    seq: Seq
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None

    @classmethod
    def build(
        cls,
        encoded: EncodedPrompt,
        params: SamplingParams,
        *,
        tokenizer: Tokenizer,
        request_id: str,
        cache_salt: str = "",
        adapter_slot: int = 0,
    ) -> PreparedRequest:
        seq = Seq(
            request_id=request_id,
            prompt_ids=encoded.ids,
            params=params,
            max_tokens=encoded.max_tokens,
            arrival_s=time.monotonic(),
            cache_salt=cache_salt,
            adapter_slot=adapter_slot,
        )
        # A completion continues the prompt's text: the prompt's last tokens decide
        # whether its first token's leading space shows. A chat's reply starts afresh.
        detok = IncrementalDetokenizer(tokenizer, None if encoded.chat else encoded.ids)
        stops = StopStringMatcher(params.stop) if params.stop else None
        return cls(seq, detok, stops)

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self.seq.max_tokens

    def append(
        self, token: int, *, eos_token_ids: Collection[int], token_capacity: int
    ) -> tuple[str, FinishReason | None]:
        """Adds a sampled token; returns the text it released (held back while it may
        still be part of a stop string or a character) and why the request ends now, if
        it does. The engine finishes it."""
        seq = self.seq
        seq.output_ids.append(token)
        is_eos = token in eos_token_ids and not seq.params.ignore_eos
        text = "" if is_eos else self.detok.push(token)
        if self.stops is not None:
            text, stopped = self.stops.feed(text)
            if stopped:  # the text stops before the stop string; nothing follows it
                return text, FinishReason.STOP
        if is_eos:
            return text + self._flush(), FinishReason.STOP
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= token_capacity:
            return text + self._flush(), FinishReason.LENGTH
        return text, None

    def _flush(self) -> str:
        tail = self.detok.flush()
        if self.stops is None:
            return tail
        text, _ = self.stops.feed(tail)
        return text + self.stops.flush()

    def output(self, text: str, token_ids: list[int]) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            usage=seq.usage(),
            error=seq.error,
        )
