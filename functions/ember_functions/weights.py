"""Loading Hugging Face checkpoints into :class:`LlamaModel`.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json``, maps HF
tensor names onto our fused layout (q/k/v -> qkv, gate/up -> gate_up) and binds the
model's meta parameters to the result.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from ember_core import ConfigError, ModelFormatError
from ember_functions.config import ModelConfig
from ember_functions.linear import Linear
from ember_functions.model import LlamaModel

if TYPE_CHECKING:
    from ember_functions.bound_cache import BoundCache
    from ember_functions.engine_config import EngineConfig

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX).

    Without them torch's bf16 GEMM is emulated and ~8x slower than float32 for
    prefill-sized matrices (measured on 2-core AVX2 machines). With AVX512-BF16 (a
    2-core AMD EPYC, ``bench/engine.py``) bf16 runs prefill and batched decode ~1.5x
    faster than float32 on the 1.1B model, and a bf16 checkpoint binds with no
    conversion at all, which is most of a cold start.
    """
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)
    except RuntimeError:  # a build without the probes' CPU info
        return False


@functools.cache  # once per process: every engine built after it would say the same
def _warn_emulated_bf16() -> None:
    log.warning(
        "dtype='bfloat16' on a CPU without bf16 matmul units (AVX512-BF16 or AMX): torch "
        "emulates it, 3-4.5x slower to prefill than float32 (an Ice Lake Xeon, "
        "bench/linear.py); dtype='auto' computes a bf16 checkpoint in float32 here"
    )


def resolve_compute_dtype(
    requested: str, *, weights_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """Pick the dtype matmuls run in.

    ``auto`` keeps the checkpoint's dtype where the hardware computes it natively
    (CUDA, bf16-capable CPUs) and computes in float32 elsewhere; weights stay
    stored in their checkpoint dtype either way.
    """
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise ConfigError(
                f"dtype {requested!r} is not one of auto, {', '.join(names)}; pick one of those"
            )
        if requested == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
            _warn_emulated_bf16()
        return names[requested]
    if device.type == "cuda":
        return weights_dtype if weights_dtype != torch.float32 else torch.bfloat16
    if weights_dtype == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index} is not a valid safetensors index: {exc}") from None
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise ModelFormatError(
                f"{index.name} lists shards missing from {model_dir}: {', '.join(missing)}; "
                "copy or download the whole checkpoint"
            )
        return shards
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelFormatError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir}; "
        "convert the checkpoint to safetensors first"
    )


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failures, on opening or on reading, are ModelFormatErrors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
            "corrupt: copy or convert it again"
        ) from None


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _weight_files(model_dir):
        with _readable(path) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The embedding table's dtype, read from the safetensors headers alone."""
    for path in _weight_files(model_dir):
        with _readable(path) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if name.endswith("embed_tokens.weight"):
                    code = f.get_slice(name).get_dtype()
                    if code not in _SAFETENSORS_DTYPES:
                        raise ModelFormatError(
                            f"{path} stores weights as {code}; Ember loads F32, BF16 or F16 "
                            "checkpoints: convert it first"
                        )
                    return _SAFETENSORS_DTYPES[code]
    raise ModelFormatError(f"{model_dir} has no model.embed_tokens.weight tensor")


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    gemv_dtype: torch.dtype | None = None,
    bound: BoundCache | None = None,
) -> LlamaModel:
    """Builds the model from a Hugging Face directory (see :func:`build_model`)."""
    return build_model(
        ModelConfig.from_dir(model_dir),
        iter_hf_tensors(model_dir),
        source=str(model_dir),
        dtype=dtype,
        device=device,
        max_positions=max_positions,
        gemv_dtype=gemv_dtype,
        bound=bound,
    )


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    source: str,  # where the tensors came from, for errors
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    gemv_dtype: torch.dtype | None = None,
    bound: BoundCache | None = None,
) -> LlamaModel:
    """Builds the model on the meta device and binds it to ``tensors`` (HF names),
    from a directory or from the weights store's flat buffers alike.

    ``gemv_dtype`` keeps a copy of every matrix in that dtype for single-sequence
    decode (see linear.py); :func:`gemv_dtype_for` says when that pays. ``bound`` (CPU
    only) maps what an earlier worker bound instead of converting, or keeps what this
    one converts for the next.
    """
    source_name = source  # the fused tensors are not the only "source" here
    # Fuse in the checkpoint's own dtype (half the bytes of float32 to concatenate), then
    # convert once. The 16-bit fused matrices are exactly what a float32 -> 16-bit copy
    # would give back, so they double as the gemv copies: no second conversion pass.
    hf = {name.removeprefix("model."): t for name, t in tensors if "rotary_emb" not in name}
    fused = _fuse(config, hf)
    # Tensors we would silently drop (an o_proj or MLP bias, extra layers) mean the
    # checkpoint is a variant we do not run exactly: refuse rather than run it wrong.
    leftover = sorted(n for n in hf if not (n == "lm_head.weight" and config.tie_word_embeddings))
    if leftover:
        raise ModelFormatError(
            f"checkpoint {source_name} has tensors Ember does not use: {leftover[:4]}"
            f"{' ...' if len(leftover) > 4 else ''}; this {config.model_type} variant "
            "(e.g. attention_bias or mlp_bias on a llama) is not supported"
        )
    deferred = _deferred_matrices(config, fused, dtype=dtype, gemv_dtype=gemv_dtype)
    eager = {name: t for name, t in fused.items() if name not in deferred}
    converts = device.type == "cpu" and any(t.dtype != dtype for t in eager.values())
    state = None
    if bound is not None and converts:
        state = bound.load({name: t.shape for name, t in eager.items()})
    if state is None:
        state = {name: t.to(device=device, dtype=dtype) for name, t in eager.items()}
        if bound is not None and converts:
            bound.store_in_background(state)
    state |= {n: torch.empty(t.shape, dtype=dtype, device="meta") for n, t in deferred.items()}
    linear = Linear(device=device, dtype=dtype)
    # Its parameters are made on the meta device, each by name (no ``torch.device``
    # context: that touches ``torch.nested``, which a new worker defers).
    model = LlamaModel(config, linear=linear)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFormatError(
            f"checkpoint {source} lacks tensors for {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}; is it a complete {config.model_type} model?"
        )
    for name, tensor in state.items():
        if name not in expected:
            continue
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise ModelFormatError(
                f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; config and weights do not belong together"
            )
    model.load_state_dict(state, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.init_rope(max_positions=max_positions or config.max_context, device=device)
    if gemv_dtype is not None and gemv_dtype != dtype:
        # When every fused matrix is a view of the loaded buffers, the 16-bit copies are
        # those buffers, whole and shared (mapped host-tier pages stay shared). Otherwise
        # the concatenations are new tensors, and views of the loaded buffers are cloned
        # so that those buffers are freed rather than held by a few views.
        mats = {n: t for n, t in fused.items() if t.dtype == gemv_dtype and t.dim() == 2}
        fused_names = [n for n in mats if n.endswith(("qkv_weight", "gate_up_weight"))]
        shared = all(mats[n]._base is not None for n in fused_names)
        model.add_gemv_weights(
            gemv_dtype,
            {n: t if shared or n in fused_names else t.clone() for n, t in mats.items()},
        )
    return model.eval()


def build_engine_model(
    config: EngineConfig,
    model_config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    weights_dtype: torch.dtype,
    source: str,
    bound: Callable[[torch.dtype], BoundCache | None] | None = None,
) -> LlamaModel:
    """The one place an engine's settings become a model: threads, compute dtype, and
    the bf16 copies for single-sequence decode (dtype="auto" only). ``bound`` gives where
    weights bound in a dtype are kept between workers (see ``bound_cache``)."""
    device = torch.device(config.device)
    if device.type == "cpu" and config.num_threads:
        torch.set_num_threads(config.num_threads)
    dtype = resolve_compute_dtype(config.dtype, weights_dtype=weights_dtype, device=device)
    gemv = None
    if config.gemv_weights and config.dtype == "auto":
        gemv = gemv_dtype_for(weights_dtype=weights_dtype, compute_dtype=dtype, device=device)
    return build_model(
        model_config,
        tensors,
        source=source,
        dtype=dtype,
        device=device,
        max_positions=config.max_model_len,
        gemv_dtype=gemv,
        bound=bound(dtype) if bound is not None else None,
    )


def gemv_dtype_for(
    *, weights_dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device
) -> torch.dtype | None:
    """The low-precision copy worth keeping for single-row decode, if any: the
    checkpoint's own 16-bit dtype, when the CPU computes in float32. The copy holds
    the checkpoint's exact values, so only activation rounding differs."""
    if device.type == "cpu" and compute_dtype == torch.float32 and weights_dtype == torch.bfloat16:
        return weights_dtype
    return None


_MATRICES = ("qkv", "o", "gate_up", "down")  # a layer's, as DecoderLayer.matrices names them


def deferred_matrix_names(config: ModelConfig) -> list[str]:
    """The state-dict names of the matrices binding leaves unconverted when the CPU
    computes a bf16 checkpoint in float32 with its bf16 single-row copies: a multi-row
    call converts each per call (``Linear.converted``) and packing converts each once,
    when the worker is idle. Converting them at bind would fault in a float32 copy of the
    model on the way to the first token (the 1.1B model: 4.1 GiB, 1.8-5.4 s on 2 cores)
    that the packed copies then replace. A stored packed copy is checked against the
    first matrix, which is converted for that (``LlamaModel.matrices_to_check``)."""
    names = [f"layers.{i}.{m}_weight" for i in range(config.num_layers) for m in _MATRICES]
    return names if config.tie_word_embeddings else [*names, "lm_head"]


def _deferred_matrices(
    config: ModelConfig,
    fused: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    gemv_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Of ``fused``, the matrices :func:`deferred_matrix_names` names, where their
    single-row copies are they themselves in a dtype other than the compute one."""
    if gemv_dtype is None or gemv_dtype == dtype:
        return {}
    names = deferred_matrix_names(config)
    return {n: fused[n] for n in names if n in fused and fused[n].dtype == gemv_dtype}


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along rows; a view, not a copy, when the parts already lie
    side by side in one storage (the weights store lays fused projections out so)."""
    first = parts[0]
    adjacent = all(
        p.is_contiguous()
        and p.dtype == first.dtype
        and p.shape[1:] == first.shape[1:]
        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for p in parts
    ) and all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in itertools.pairwise(parts))
    if not adjacent:
        return torch.cat(parts)
    rows = sum(p.shape[0] for p in parts)
    shape = (rows, *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def _fuse(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise ModelFormatError(f"checkpoint lacks tensor model.{name}") from None

    state: dict[str, torch.Tensor] = {
        "embed": take("embed_tokens.weight"),
        "norm.weight": take("norm.weight"),
    }
    if not config.tie_word_embeddings:
        state["lm_head"] = take("lm_head.weight")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        state[p + "qkv_weight"] = _concat(
            [take(attn + f"{n}_proj.weight") for n in ("q", "k", "v")]
        )
        if config.qkv_bias:
            state[p + "qkv_bias"] = torch.cat(
                [take(attn + f"{n}_proj.bias") for n in ("q", "k", "v")]
            )
        state[p + "o_weight"] = take(attn + "o_proj.weight")
        state[p + "gate_up_weight"] = _concat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]
        )
        state[p + "down_weight"] = take(mlp + "down_proj.weight")
        state[p + "input_norm.weight"] = take(p + "input_layernorm.weight")
        state[p + "post_attention_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return state
