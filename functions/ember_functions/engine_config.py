"""Engine settings, validated at construction; unknown keys are rejected."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember_core import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How one engine runs one model.

    Example::

        EngineConfig(max_num_seqs=32, kv_cache_bytes=512 << 20, dtype="auto")
    """

    device: str = "cpu"
    dtype: str = "auto"  # matmul dtype; "auto" picks what the hardware does natively
    num_threads: int | None = None  # torch intra-op threads on CPU; None = all cores
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 1 << 30  # sizes the KV cache unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget per step (chunked prefill)
    max_model_len: int | None = None  # caps the model's context window
    prefix_cache: bool = True
    # With dtype="auto" on CPUs that compute a bf16 checkpoint in float32: keep its bf16
    # matrices too, for single-sequence decode (~1.4x its speed, half the model's size
    # again in RAM). A lone sequence then rounds activations to bf16, so its tokens can
    # differ from the same request batched; dtype="float32" is exactly batch-invariant.
    gemv_weights: bool = True
    # On CPUs with oneDNN: keep a copy of every matrix in its blocked layout (1.2-2.5x
    # faster matmuls below ~40 rows, even from 64 up; the compute-dtype model's size
    # again in private RAM). A worker packs while idle once it serves; an engine in a
    # script packs on pack_weights().
    pack_weights: bool = True
    # Through a store with a host tier: map the packed matrices the machine's first
    # worker of the model left there instead of packing (no private copy, packed from
    # the first request), and leave them there if this worker packs first (see
    # packed_cache.py). Off: every worker packs its own.
    share_packing: bool = True
    # Host RAM (bytes) packing leaves available: a worker stops packing before the layer
    # that would go below it (see host_memory.py). None: a tenth of RAM, at least 1 GiB.
    pack_min_free_bytes: int | None = None
    seed: int = 0  # for requests that give no seed

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        positive = {
            "block_size": self.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        optional = {
            "num_kv_blocks": self.num_kv_blocks,
            "max_model_len": self.max_model_len,
            "num_threads": self.num_threads,
        }
        for name, value in {**positive, **optional}.items():
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        floor = self.pack_min_free_bytes
        bad_floor = isinstance(floor, bool) or not isinstance(floor, int) or floor < 0
        if floor is not None and bad_floor:
            raise ConfigError(
                f"pack_min_free_bytes must be a byte count >= 0 or None, got {floor!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown engine setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)
