"""The bodies the gateway sends, as pydantic models: the OpenAPI schema's source of truth.

The server never builds these: ``openai_protocol``'s builders return plain dicts, because a
stream sends one body per token and validating each would cost more than the rest of the
hot path. These models document those dicts exactly (``tests/platform/test_openapi.py``
validates real responses against the published schema), so:

- ``extra="forbid"`` publishes ``additionalProperties: false``: a key a builder adds without
  adding it here fails that test instead of going undocumented;
- a key a builder always sends is required, even when its value can be null;
- a key a builder sometimes leaves out (a stream delta's ``role``, a chunk's ``usage``) is
  optional; ``_absent`` keeps ``null`` out of its schema where the key is never null.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ErrorResponse",
    "Health",
    "ModelList",
    "Readiness",
    "TextCompletion",
    "TextCompletionChunk",
    "UsageList",
]

#: ``ember_functions.sequence.FinishReason`` values; null while a stream is still running.
FinishReason = Literal["stop", "length", "cancelled", "error"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _absent() -> Any:
    """A key that is sometimes left out but never null: no ``null`` branch, no default."""
    return Field(default=None, json_schema_extra=_drop_default)


class PromptTokensDetails(_Body):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class CompletionUsage(_Body):
    """What the request is billed for: the engine's own counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletionMessage(_Body):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(_Body):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason | None
    logprobs: None = Field(description="Always null: log-probabilities are not supported.")


class ChatCompletion(_Body):
    """`POST /v1/chat/completions` without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int = Field(description="Unix time, seconds.")
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatCompletionDelta(_Body):
    """The first chunk carries `role` (and empty `content`), later ones new `content`,
    the one with `finish_reason` may carry neither."""

    role: Literal["assistant"] | SkipJsonSchema[None] = _absent()
    content: str | SkipJsonSchema[None] = _absent()


class ChatCompletionChunkChoice(_Body):
    index: int
    delta: ChatCompletionDelta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(_Body):
    """One `data:` event of a streamed chat completion. With
    `stream_options.include_usage` the last chunk has no choices and carries `usage`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = Field(
        default=None, description="Only on the last chunk, when include_usage was asked for."
    )


class TextCompletionChoice(_Body):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class TextCompletion(_Body):
    """`POST /v1/completions` without `stream`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: CompletionUsage


class TextCompletionChunk(_Body):
    """One `data:` event of a streamed completion; the usage-only last chunk as for chat."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: CompletionUsage | None = Field(
        default=None, description="Only on the last chunk, when include_usage was asked for."
    )


class Model(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Body):
    object: Literal["list"]
    data: list[Model]


class UsageRow(_Body):
    """One model, adapter and key's totals in the period."""

    model: str
    adapter: str = Field(description='The adapter billed; "" for the base model.')
    key: str = Field(description="The API key's id (not the secret).")
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int = Field(description="Cost in millionths of the currency unit.")


class UsageList(_Body):
    object: Literal["list"]
    period: str | None = Field(
        description="The period asked for (a month, 2026-12); null when none was: this month."
    )
    data: list[UsageRow]


class Health(_Body):
    status: Literal["ok"]


class Readiness(_Body):
    status: Literal["ready", "not ready"]
    models: list[str]


class WorkerRow(_Body):
    model: str
    worker_id: str
    pid: int | None  # None while it starts
    state: str  # a WorkerState name
    in_flight: int
    idle_s: float | None
    cold_start: dict[str, float]  # the phases of its start, seconds
    private_bytes: int | None  # RAM only this worker holds: what stopping it frees
    proportional_bytes: int | None  # its share of every page it maps, shared ones split


class WorkerList(_Body):
    object: Literal["list"]
    data: list[WorkerRow]


class ErrorDetail(_Body):
    message: str = Field(description="What was wrong and what to do about it.")
    type: str = Field(
        description="OpenAI's error type: invalid_request_error, authentication_error, "
        "insufficient_quota, rate_limit_error or server_error."
    )
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="A stable code, e.g. model_not_found, payload_too_large.")


class ErrorResponse(_Body):
    """Every error, whatever its status; also sent as a `data:` event if a stream fails."""

    error: ErrorDetail
