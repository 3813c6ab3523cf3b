"""Where a router's handle on a worker gets its prompt encoder, and what it encodes.

A ``WorkerProcess`` encodes prompts itself, with the worker's tokenizer and window, so a
bad request is refused before it crosses the socket. Parsing a 49k-entry tokenizer takes
~0.15 s, so it is done as rarely and as early as possible: an encoder already at hand is
used when it fits (the handle's own from before a promotion, or one a pool's first worker
gave), and otherwise the tokenizer is parsed on a thread as soon as the worker says where
it is, while the worker is still loading its weights.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember_functions.prompt import EncodedPrompt, PromptEncoder
from ember_functions.rpc import pack_params
from ember_functions.sampling_params import SamplingParams
from ember_functions.tokenizer import Tokenizer

__all__ = ["RemoteRequest", "WorkerPrompts"]


@dataclass(frozen=True)
class RemoteRequest:
    """A request encoded for a worker: what billing needs, and what the worker runs."""

    request_id: str
    encoded: EncodedPrompt
    params: SamplingParams
    cache_salt: str

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.ids)

    @property
    def max_tokens(self) -> int:
        return self.encoded.max_tokens

    def start_frame(self) -> dict[str, Any]:
        """The ``start`` frame that hands it to the worker (see ``rpc``)."""
        return {
            "op": "start",
            "id": self.request_id,
            "prompt_ids": self.encoded.ids,
            "chat": self.encoded.chat,
            "max_tokens": self.encoded.max_tokens,
            "params": pack_params(self.params),
            "cache_salt": self.cache_salt,
        }


class WorkerPrompts:
    """One worker handle's prompt encoder, from its READY message.

    Example::

        prompts = WorkerPrompts(worker_id="w1", known=first_worker.prompts)
        prompts.announced("/home/models/smollm2-135m")  # the worker's "tokenizer" frame
        encoder = prompts.for_ready(ready_message)       # its "ready" frame
    """

    def __init__(self, *, worker_id: str, known: PromptEncoder | None = None) -> None:
        self.worker_id = worker_id
        self.current: PromptEncoder | None = None  # the encoder of the worker's engine now
        self.known = known  # offered by another worker of the model
        # The tokenizer the worker said it loads, parsed here while it loads (dir, parse).
        self.early: tuple[str, Future[Tokenizer]] | None = None

    def announced(self, tokenizer_dir: str) -> None:
        """The worker says where its tokenizer is, before it is READY: unless an encoder
        at hand has that tokenizer, parse it now, on a thread, while the worker loads its
        weights (READY would otherwise wait for the parse)."""
        held = (self.current, self.known)
        if any(p is not None and str(p.tokenizer.source_dir) == tokenizer_dir for p in held):
            return
        if self.early is not None and self.early[0] == tokenizer_dir:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"ember-tokenizer-{self.worker_id}")
        self.early = (tokenizer_dir, pool.submit(Tokenizer.from_dir, Path(tokenizer_dir)))
        pool.shutdown(wait=False)  # the thread ends with its one task

    def for_ready(self, ready: dict[str, Any]) -> PromptEncoder:
        """The encoder for the engine whose READY message is ``ready``: one at hand if it
        has the same tokenizer and window (after a promotion, and across a pool's
        workers), else the worker's tokenizer, parsed early if it was announced."""
        fitting = next(
            (p for p in (self.current, self.known) if p is not None and _fits(p, ready)), None
        )
        return fitting or PromptEncoder(
            self._tokenizer(ready["tokenizer_dir"]),
            vocab_size=ready["vocab_size"],
            token_capacity=ready["token_capacity"],
        )

    def _tokenizer(self, tokenizer_dir: str) -> Tokenizer:
        early = self.early
        if early is not None and early[0] == tokenizer_dir:
            # If that parse failed, parsing again below raises the error as it always did.
            with contextlib.suppress(Exception):
                return early[1].result()
        return Tokenizer.from_dir(Path(tokenizer_dir))


def _fits(prompts: PromptEncoder, ready: dict[str, Any]) -> bool:
    """Whether ``prompts`` encodes for the worker whose READY message is ``ready``."""
    return (
        str(prompts.tokenizer.source_dir) == ready["tokenizer_dir"]
        and prompts.vocab_size == ready["vocab_size"]
        and prompts.token_capacity == ready["token_capacity"]
    )
