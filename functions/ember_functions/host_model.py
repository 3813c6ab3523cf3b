"""A model held in host RAM, not bound: the HOST warmth of a worker.

Loading a model is two steps with different costs. ``HostModel.from_store`` (or
``from_dir``) brings the checkpoint's tensors into this process's memory in their stored
dtype: fetched from the nearest tier, decompressed and verified, with the tokenizer and
the architecture. ``LLMEngine.from_host`` then binds them: the compute-dtype conversion,
the fused layout, the KV cache. A worker held in reserve at HOST warmth has paid for the
first step only; promoting it to READY pays for the second. Demoting it drops the engine
and keeps this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember_functions.config import ModelConfig
from ember_functions.tokenizer import Tokenizer
from ember_functions.weights import checkpoint_dtype, iter_hf_tensors
from ember_weights_store.tokenizer_files import tokenizer_dir, tokenizer_dir_name

if TYPE_CHECKING:
    from ember_functions.bound_cache import BoundCache
    from ember_functions.packed_cache import PackedCache
    from ember_functions.prefix_kv_cache import PrefixKVCache
    from ember_weights_store import LoadReport, Manifest, WeightsStore
    from ember_weights_store.host_tier import HostTier
    from ember_weights_store.verified import VerifiedCopies

__all__ = ["HostModel", "store_tokenizer"]

EMBED_NAME = "model.embed_tokens.weight"


@dataclass(frozen=True, kw_only=True)
class HostModel:
    """A checkpoint's tensors in host RAM, with what building an engine from them needs.

    Example::

        host = HostModel.from_store(store, "smollm2-135m", tokenizer_cache=home / "tokenizers")
        engine = LLMEngine.from_host(host, config=EngineConfig())
    """

    model_id: str
    model_config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names -> tensors in the stored dtype
    weights_dtype: torch.dtype
    # A future while it still loads (on a thread, overlapping the weights and the bind).
    tokenizer_future: Future[Tokenizer]
    source: str  # for error messages: where the tensors came from
    report: LoadReport | None = None  # the store's account of the load, if through it
    load_s: float = 0.0
    # Through a store with a host tier: where bound weights are kept for the next worker.
    host_tier: HostTier | None = None
    manifest: Manifest | None = None

    def mapped_storages(self) -> frozenset[int]:
        """The base addresses of the storages its tensors view when the load mapped the
        chunk files in place (``LoadReport.mapped``); empty when they are this process's
        own copies. A tensor bound without a copy shares one of them."""
        if self.report is None or not self.report.mapped:
            return frozenset()
        return frozenset(t.untyped_storage().data_ptr() for t in self.tensors.values())

    def bound_cache(self, dtype: torch.dtype) -> BoundCache | None:
        """Where this model's weights bound in ``dtype`` are kept on this machine, if
        anywhere (a store with a host tier)."""
        if self.host_tier is None or self.manifest is None:
            return None
        from ember_functions.bound_cache import BoundCache

        return BoundCache.for_model(self.host_tier, self.manifest, dtype)

    def packed_cache(self, dtype: torch.dtype, *, pack_rows: int) -> PackedCache | None:
        """Where this model's matrices packed in ``dtype`` for ``pack_rows`` rows are kept
        on this machine, if anywhere (a store with a host tier)."""
        if self.host_tier is None or self.manifest is None:
            return None
        from ember_functions.packed_cache import PackedCache

        return PackedCache.for_model(self.host_tier, self.manifest, dtype, pack_rows=pack_rows)

    def prefix_kv_cache(self, dtype: torch.dtype, *, block_size: int) -> PrefixKVCache | None:
        """Where this model's public-prefix KV in ``dtype`` blocks of ``block_size`` is
        kept on this machine, if anywhere (a store with a host tier)."""
        if self.host_tier is None or self.manifest is None:
            return None
        from ember_functions.prefix_kv_cache import PrefixKVCache

        return PrefixKVCache.for_model(self.host_tier, self.manifest, dtype, block_size=block_size)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.tokenizer_future.result()

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def from_store(
        cls,
        store: WeightsStore,
        model_id: str,
        *,
        revision: str = "main",
        tokenizer_cache: Path,
        tokenizers: Mapping[str, Tokenizer] | None = None,
        threads: int = 4,
        on_tokenizer_dir: Callable[[Path], object] | None = None,
        decode_first: bool = False,
        verified: VerifiedCopies | None = None,
        manifest: Manifest | None = None,
    ) -> HostModel:
        """Chunks from the nearest tier into flat buffers, tensors as views. Tokenizer
        files are written once per content hash under ``tokenizer_cache``; one found
        parsed in ``tokenizers`` (its directory -> it: a zygote's) is not parsed again.
        ``on_tokenizer_dir`` is told the tokenizer's directory as soon as it is written,
        before it is parsed (a worker tells its router, which parses it meanwhile);
        ``decode_first``: see ``Tokenizer.from_dir``; ``verified`` and ``manifest``: chunk
        files checked and the manifest read already (see ``ember_weights_store.load``)."""
        from ember_weights_store import load as load_weights

        t0 = time.perf_counter()
        manifest_s = 0.0  # read here, it is the load's manifest phase
        if manifest is None:
            manifest = store.manifest(model_id, revision)
            manifest_s = time.perf_counter() - t0
        # The tokenizer (~0.2 s of JSON parsing for a 49k vocabulary) loads on a thread
        # while the weights load and bind: most of that is torch work without the GIL.
        pool = ThreadPoolExecutor(1, thread_name_prefix="ember-tokenizer")
        tokenizer = pool.submit(
            store_tokenizer,
            store,
            manifest,
            tokenizer_cache,
            tokenizers,
            on_tokenizer_dir,
            decode_first=decode_first,
        )
        pool.shutdown(wait=False)  # the thread ends with its one task
        loaded = load_weights(
            store, model_id, revision, threads=threads, verified=verified, manifest=manifest
        )
        loaded.report.manifest_s += manifest_s
        return cls(
            model_id=model_id,
            model_config=ModelConfig.from_hf(manifest.architecture),
            tensors=loaded.tensors,
            weights_dtype=loaded.tensors[EMBED_NAME].dtype,
            tokenizer_future=tokenizer,
            source=f"{model_id}@{revision} from the weights store",
            report=loaded.report,
            load_s=time.perf_counter() - t0,
            host_tier=store.derived_tier,
            manifest=manifest,
        )

    @classmethod
    def from_dir(
        cls,
        model_dir: Path,
        *,
        model_id: str | None = None,
        tokenizers: Mapping[str, Tokenizer] | None = None,
        on_tokenizer_dir: Callable[[Path], object] | None = None,
    ) -> HostModel:
        """A Hugging Face directory's safetensors, read into memory; its tokenizer from
        ``tokenizers`` (directory -> parsed) if there, else parsed."""
        t0 = time.perf_counter()
        if on_tokenizer_dir is not None:
            on_tokenizer_dir(model_dir)
        # Cloned: safetensors hands out views of a mapped file, which are host RAM only
        # once touched; a reserve worker must have paid for the read.
        tensors = {name: t.clone() for name, t in iter_hf_tensors(model_dir)}
        return cls(
            model_id=model_id or model_dir.name,
            model_config=ModelConfig.from_dir(model_dir),
            tensors=tensors,
            weights_dtype=checkpoint_dtype(model_dir),
            tokenizer_future=_done(
                (tokenizers or {}).get(str(model_dir)) or Tokenizer.from_dir(model_dir)
            ),
            source=str(model_dir),
            load_s=time.perf_counter() - t0,
        )


def _done(tokenizer: Tokenizer) -> Future[Tokenizer]:
    future: Future[Tokenizer] = Future()
    future.set_result(tokenizer)
    return future


def store_tokenizer(
    store: WeightsStore,
    manifest: Manifest,
    cache: Path,
    parsed: Mapping[str, Tokenizer] | None = None,
    on_dir: Callable[[Path], object] | None = None,
    *,
    decode_first: bool = False,
) -> Tokenizer:
    """The manifest's tokenizer, its files written once per content hash under ``cache``;
    taken from ``parsed`` (directory -> tokenizer) when it is there. ``on_dir`` is told
    the directory once its files are there, before they are parsed."""
    tok_dir = cache / tokenizer_dir_name(manifest.tokenizer_files)
    if parsed and str(tok_dir) in parsed:
        return parsed[str(tok_dir)]  # the directory is named by its content: the same files
    tok_dir = tokenizer_dir(store, manifest, cache)
    if on_dir is not None:
        on_dir(tok_dir)
    return Tokenizer.from_dir(tok_dir, decode_first=decode_first)
