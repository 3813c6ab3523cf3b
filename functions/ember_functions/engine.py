"""The engine: one model, a paged KV cache, continuous batching.

The whole loop is :meth:`LLMEngine.step`: the scheduler decides, the runner executes,
the sampler picks tokens, and finished sequences give their blocks back at once.
The engine is single-threaded; :class:`ember_functions.service.EngineService` runs it
on a background thread and streams outputs to callers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ember_core import ContextLengthError, InvalidRequestError, ModelNotFoundError
from ember_functions.attention import KVCache
from ember_functions.block_manager import BlockManager
from ember_functions.config import ModelConfig
from ember_functions.engine_config import EngineConfig
from ember_functions.host_model import HostModel
from ember_functions.model import LlamaModel
from ember_functions.packing import Packing
from ember_functions.prefix_kv_cache import PrefixKV, PrefixKVCache
from ember_functions.prompt import EncodedPrompt, Prompt, PromptEncoder
from ember_functions.request import PreparedRequest
from ember_functions.runner import ModelRunner
from ember_functions.sampler import Sampler
from ember_functions.sampling_params import SamplingParams
from ember_functions.scheduler import Scheduler
from ember_functions.sequence import (
    Completion,
    FinishReason,
    RequestOutput,
    SequenceStatus,
    Usage,
)
from ember_functions.tokenizer import Tokenizer
from ember_functions.weights import build_engine_model, checkpoint_dtype, iter_hf_tensors
from ember_weights_store import LoadReport, WeightsStore

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        *,
        config: EngineConfig,
        model_name: str,
        aliases: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self._names = {model_name, *aliases}
        mc = model.config
        self.max_context = min(mc.max_context, config.max_model_len or mc.max_context)
        dtype_bytes = torch.empty(0, dtype=model.dtype).element_size()
        bytes_per_block = 2 * mc.num_layers * config.block_size * mc.kv_size * dtype_bytes
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // bytes_per_block)
        self.kv_cache = KVCache(
            num_layers=mc.num_layers,
            num_blocks=num_blocks,
            block_size=config.block_size,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=model.dtype,
            device=model.device,
        )
        self.blocks = BlockManager(
            num_blocks=num_blocks, block_size=config.block_size, prefix_cache=config.prefix_cache
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler(seed=config.seed)
        self._requests: dict[str, PreparedRequest] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step()
        self.load_report: LoadReport | None = None  # set when loaded through the store
        self.public_prefix_tokens: int | None = None  # set by cache_public_prefix
        # Where the machine keeps the public prefix's KV for this model, if anywhere.
        self.prefix_kv: PrefixKVCache | None = None
        self.packing = Packing(model, enabled=config.pack_weights)  # packed matrices
        # Encodes and validates prompts for this engine's tokenizer and window.
        self.prompts = PromptEncoder(
            tokenizer, vocab_size=mc.vocab_size, token_capacity=self.token_capacity
        )

    @classmethod
    def from_dir(
        cls,
        model_dir: Path,
        *,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        aliases: Sequence[str] = (),
    ) -> LLMEngine:
        config = config or EngineConfig()
        model = build_engine_model(
            config,
            ModelConfig.from_dir(model_dir),
            iter_hf_tensors(model_dir),
            weights_dtype=checkpoint_dtype(model_dir),
            source=str(model_dir),
        )
        return cls(
            model,
            Tokenizer.from_dir(model_dir),
            config=config,
            model_name=model_name or model_dir.name,
            aliases=aliases,
        )

    @classmethod
    def from_store(
        cls,
        store: WeightsStore,
        model_id: str,
        *,
        revision: str = "main",
        config: EngineConfig | None = None,
        tokenizer_cache: Path,
        threads: int = 4,
    ) -> LLMEngine:
        """Loads a model through the weights store (``HostModel.from_store``) and binds it."""
        host = HostModel.from_store(
            store, model_id, revision=revision, tokenizer_cache=tokenizer_cache, threads=threads
        )
        return cls.from_host(host, config=config)

    @classmethod
    def from_host(cls, host: HostModel, *, config: EngineConfig | None = None) -> LLMEngine:
        """Binds a model already in host RAM: compute dtype, fused layout, KV cache. The
        host copy is left as it was, so a worker can drop the engine and bind again."""
        config = config or EngineConfig()
        model = build_engine_model(
            config,
            host.model_config,
            host.tensors.items(),
            weights_dtype=host.weights_dtype,
            source=host.source,
            bound=host.bound_cache,
        )
        engine = cls(model, host.tokenizer, config=config, model_name=host.model_id)
        engine.load_report = host.report
        engine.packing.maps_weights(host.mapped_storages())
        if config.share_packing:  # Packing.share does nothing where packing is off
            engine.packing.share(host.packed_cache(model.dtype, pack_rows=model.linear.pack_rows))
        engine.prefix_kv = host.prefix_kv_cache(model.dtype, block_size=config.block_size)
        engine.restore_public_prefix()
        return engine

    # -- requests ------------------------------------------------------------------

    @property
    def token_capacity(self) -> int:
        """Most tokens one sequence can hold: the context window, or the whole cache."""
        return min(self.max_context, self.blocks.num_blocks * self.blocks.block_size)

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        model: str | None = None,
        cache_salt: str = "",
        adapter_slot: int = 0,
    ) -> PreparedRequest:
        """Validates and tokenizes a request without touching engine state, so it is
        safe to call from any thread; errors reach the caller before anything runs."""
        if model is not None and model not in self._names:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; available: {', '.join(sorted(self._names))}",
                param="model",
            )
        return self.request_from_encoded(
            self.prompts.encode(prompt, params),
            params,
            request_id=request_id or f"req-{uuid.uuid4().hex}",
            cache_salt=cache_salt,
            adapter_slot=adapter_slot,
        )

    def request_from_encoded(
        self,
        encoded: EncodedPrompt,
        params: SamplingParams,
        *,
        request_id: str,
        cache_salt: str = "",
        adapter_slot: int = 0,
    ) -> PreparedRequest:
        """A request from a prompt encoded elsewhere (a router in front of a worker
        process); the encoder checked it against this engine's capacity."""
        if len(encoded.ids) + encoded.max_tokens > self.token_capacity:
            raise ContextLengthError(
                f"prompt ({len(encoded.ids)} tokens) plus max_tokens ({encoded.max_tokens}) is "
                f"more than this engine's {self.token_capacity} tokens; shorten the request",
                param="max_tokens",
            )
        return PreparedRequest.build(
            encoded,
            params,
            tokenizer=self.tokenizer,
            request_id=request_id,
            cache_salt=cache_salt,
            adapter_slot=adapter_slot,
        )

    def enqueue(self, request: PreparedRequest) -> str:
        rid = request.seq.request_id
        if rid in self._requests:
            raise InvalidRequestError(f"request id {rid!r} is already running; use a unique id")
        self._requests[rid] = request
        self.scheduler.add(request.seq)
        return rid

    def add_request(self, prompt: Prompt, params: SamplingParams, **kwargs: Any) -> str:
        """Validates, tokenizes and queues a request; returns its id."""
        return self.enqueue(self.make_request(prompt, params, **kwargs))

    def cancel(self, request_id: str) -> bool:
        """Stops a request now and frees its KV blocks; False if it already ended."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, FinishReason.CANCELLED)
        self._pending.append(req.output("", []))
        return True

    def cancel_all(self) -> None:
        """Cancels every request; their final outputs come from the next ``step()``."""
        for rid in list(self._requests):
            self.cancel(rid)

    def usage_of(self, request_id: str) -> Usage | None:
        """Usage so far of a request still in the engine, else None."""
        req = self._requests.get(request_id)
        return req.seq.usage() if req is not None else None

    # -- the loop ------------------------------------------------------------------

    def cache_public_prefix(self) -> int:
        """Computes the KV of the chat template's preamble (``Tokenizer.chat_preamble``:
        what every chat without a system prompt of its own starts with) and pins it, so
        every tenant's chat requests start with all of it computed (``BlockManager``
        explains why sharing it is safe, and how the tail past its last whole block is
        shared by copy). Returns the tokens cached, 0 when the prefix cache is off.

        It runs a prefill of those tokens on the calling thread, so call it from the
        engine's thread while nothing else runs: a worker does once it is idle.

        Example::

            engine.cache_public_prefix()  # 23 for SmolLM2
        """
        if self.public_prefix_tokens is not None:
            return self.public_prefix_tokens  # done once per engine
        if self.has_unfinished():
            raise RuntimeError("cache_public_prefix runs only while the engine is idle")
        self.blocks.set_public_prefix(self.tokenizer.chat_preamble())
        preamble = self.blocks.public_prefix
        seq = None
        if preamble and len(preamble) + 2 <= self.token_capacity:
            # Two tokens asked for, so the sequence still holds its blocks once the
            # prefill has computed them all: the tail's block is pinned from it.
            request = self.request_from_encoded(
                EncodedPrompt(ids=preamble, chat=True, max_tokens=2),
                SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                request_id=f"public-prefix-{uuid.uuid4().hex}",
            )
            seq = request.seq
            self.enqueue(request)
            while self.has_unfinished() and seq.num_computed_tokens < len(preamble):
                self.step()
        self.public_prefix_tokens = self.blocks.pin_public_prefix(seq)
        if seq is not None and self.cancel(seq.request_id):
            self.step()  # hands back the cancelled request's output: nobody reads it
        if self.prefix_kv is not None and 0 < self.public_prefix_tokens == len(preamble):
            # All of it pinned: kept for the model's next engines on this machine.
            blocks = self.kv_cache.read_blocks(self.blocks.public_prefix_blocks())
            self.prefix_kv.store(PrefixKV(preamble, blocks))
        return self.public_prefix_tokens

    def restore_public_prefix(self) -> int:
        """Pins the public prefix with the KV another engine of the model on this machine
        kept (``prefix_kv_cache``), so even a new worker's first request finds it computed.
        Returns the tokens restored, 0 if none fit (``cache_public_prefix`` computes them
        once idle). Run it before any request: ``from_host`` does."""
        if self.prefix_kv is None or self.public_prefix_tokens is not None:
            return 0
        found = self.prefix_kv.load(
            dtype=self.kv_cache.data.dtype,
            vocab_size=self.model.config.vocab_size,
            expected_shape=lambda n: self.kv_cache.blocks_shape(self.blocks.blocks_for(n)),
        )
        if (
            found is None
            or len(found.tokens) + 2 > self.token_capacity
            or not self.blocks.can_restore_public_prefix(len(found.tokens))
        ):
            return 0
        self.kv_cache.write_blocks(self.blocks.restore_public_prefix(found.tokens), found.blocks)
        self.public_prefix_tokens = len(found.tokens)
        return self.public_prefix_tokens

    def extend_kv_runway(self) -> int:
        """Faults in the KV pages of the fresh blocks the next requests would be given
        (``KVCache.prefault``), enough for one full step's tokens past the last block
        ever handed out; returns the blocks faulted in now (0 when the runway is whole,
        so calling it every idle turn is cheap). Resident KV memory then follows the
        load the engine has seen plus that runway, not the configured cache size.

        Example::

            if not engine.has_unfinished():
                engine.extend_kv_runway()
        """
        fresh = self.blocks.first_fresh_block
        runway = self.blocks.blocks_for(self.config.max_num_batched_tokens)
        start = max(fresh, self.kv_cache.prefaulted_to)
        stop = min(self.blocks.num_blocks, fresh + runway)
        if start >= stop:
            return 0
        self.kv_cache.prefault(start, stop)
        return stop - start

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        try:
            plan = self.scheduler.schedule()
        except Exception as exc:  # engine bookkeeping is suspect: end every request
            log.exception("scheduling failed; ending all %d requests", len(self._requests))
            for req in list(self._requests.values()):
                self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                outputs.append(req.output("", []))
            return outputs
        if not plan:
            return outputs
        try:
            logits, sampling = self.runner.execute(plan)
            for chunk in plan.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                self.blocks.commit(chunk.seq)
            seqs = [c.seq for c in sampling]
            tokens = self.sampler.sample(
                logits, [s.params for s in seqs], [s.request_id for s in seqs]
            )
        except Exception as exc:  # a failed step ends its requests, never the engine
            log.exception("engine step failed; ending the %d requests in it", len(plan.chunks))
            for chunk in plan.chunks:
                req = self._requests[chunk.seq.request_id]
                self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                outputs.append(req.output("", []))
            return outputs
        for seq, token in zip(seqs, tokens, strict=True):
            outputs.append(self._append_token(self._requests[seq.request_id], token))
        return outputs

    def _append_token(self, req: PreparedRequest, token: int) -> RequestOutput:
        text, reason = req.append(
            token, eos_token_ids=self.tokenizer.eos_token_ids, token_capacity=self.token_capacity
        )
        if reason is not None:
            self._finish(req, reason)
        return req.output(text, [token])

    def _finish(
        self, req: PreparedRequest, reason: FinishReason, *, error: str | None = None
    ) -> None:
        seq = req.seq
        self.scheduler.remove(seq)
        self.sampler.forget(seq.request_id)
        seq.finish_reason = reason
        seq.error = error
        seq.status = SequenceStatus.FINISHED
        self._requests.pop(seq.request_id, None)

    # -- convenience ---------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Runs prompts to completion on the calling thread (tests, benchmarks)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        # Validate every prompt before queueing any, so one bad prompt queues nothing.
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        ids = [self.enqueue(r) for r in requests]
        parts: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in parts:
                    parts[out.request_id].append(out)
        return [Completion.from_outputs(parts[rid]) for rid in ids]
