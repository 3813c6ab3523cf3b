"""Prompts to token ids, with every check a request must pass before it may cost anything.

An engine encodes its own prompts; a router in front of worker processes encodes them too,
with the same tokenizer and the capacity the worker reported, so a request is validated and
priced in the gateway and the worker receives token ids only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember_core import ContextLengthError, InvalidRequestError
from ember_functions.sampling_params import SamplingParams
from ember_functions.tokenizer import Tokenizer

__all__ = ["EncodedPrompt", "Prompt", "PromptEncoder", "is_chat"]

#: A prompt is raw text, token ids, or chat messages (rendered with the chat template).
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


def is_chat(prompt: Prompt) -> bool:
    return (
        not isinstance(prompt, str) and bool(prompt) and all(isinstance(m, Mapping) for m in prompt)
    )


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    # A completion continues its prompt's text (a SentencePiece leading space is part of the
    # answer); a chat reply starts fresh, as OpenAI's replies do. The detokenizer needs to know.
    chat: bool
    max_tokens: int  # max_tokens, or all the room the context window leaves


class PromptEncoder:
    """Tokenizes and validates prompts against a context of ``token_capacity`` tokens."""

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int, token_capacity: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.token_capacity = token_capacity

    def encode(self, prompt: Prompt, params: SamplingParams) -> EncodedPrompt:
        ids = self._tokenize(prompt)
        n, capacity = len(ids), self.token_capacity
        if n >= capacity:
            raise ContextLengthError(
                f"prompt is {n} tokens but the context window is {capacity} tokens "
                "(the prompt must leave room for at least one generated token); "
                "shorten the prompt",
                param="prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > capacity:
            raise ContextLengthError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{n + params.max_tokens} tokens, more than the context window of {capacity}; "
                f"lower max_tokens to at most {capacity - n} or shorten the prompt",
                param="max_tokens",
            )
        return EncodedPrompt(ids, is_chat(prompt), params.max_tokens or capacity - n)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(
                    "prompt is empty; send at least one character", param="prompt"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif is_chat(prompt):
            # BOS is added only when the model wants one and the template did not
            # render it (the fallback template never does).
            ids = self.tokenizer.encode_chat(prompt)  # type: ignore[arg-type]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                    param="prompt",
                )
        else:
            raise InvalidRequestError(
                "prompt must be a non-empty string, a list of token ids, or a list of chat "
                "messages ({'role': ..., 'content': ...})",
                param="prompt",
            )
        if not ids:
            raise InvalidRequestError(
                "prompt encodes to zero tokens; send some text", param="prompt"
            )
        return ids
