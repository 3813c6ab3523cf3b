"""A request's state inside the engine: its tokens, its KV blocks, its lifecycle."""

from __future__ import annotations

import enum
from collections.abc import Sequence as _Seq
from dataclasses import dataclass, field

from ember_functions.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # holds KV blocks, computed by every step
    FINISHED = "finished"  # blocks returned; nothing more happens


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Usage:
    """Exact token counts for one request. ``cached_tokens`` is a subset of
    ``prompt_tokens``: prompt tokens whose KV came from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta, and at the end, the usage."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new tokens since the previous output
    finished: bool
    finish_reason: str | None
    usage: Usage
    error: str | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    error: str | None = None

    @classmethod
    def from_outputs(cls, outputs: _Seq[RequestOutput]) -> Completion:
        last = outputs[-1]
        return cls(
            request_id=last.request_id,
            text="".join(o.text for o in outputs),
            token_ids=[t for o in outputs for t in o.token_ids],
            finish_reason=last.finish_reason,
            usage=last.usage,
            error=last.error,
        )


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context window
    arrival_s: float
    # Prefix-cache keys include the salt, so KV is only ever shared within a tenant.
    cache_salt: str = ""
    # Seam for batched LoRA: ``adapter_id`` names the adapter's content ("" = base
    # model) and keys the prefix cache; ``adapter_slot`` is where it sits on the device
    # this step (0 = none). The adapter issue fills them; the runner passes the slot
    # per token.
    adapter_id: str = ""
    adapter_slot: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in this sequence's blocks
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at first admission (billed as cached)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole list: the runner asks
        every step, and a decode only needs the last token."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def prefix_key(self) -> str:
        """What KV blocks may be shared under: same tenant and same adapter only."""
        return f"{self.cache_salt}\x00{self.adapter_id}"

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=min(self.num_cached_prompt_tokens, len(self.prompt_ids)),
        )
