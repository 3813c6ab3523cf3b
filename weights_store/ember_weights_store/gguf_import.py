"""Import a llama-architecture GGUF file (llama.cpp's format) as a Hugging Face model directory.

The output is what ``transformers.LlamaForCausalLM.from_pretrained`` and Ember's own loader
read: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
``generation_config.json``. Quantized tensors are dequantized (a GGUF's quantization does not
survive the import; the weights keep its rounding error, nothing more).

Supported: ``general.architecture == "llama"`` with a byte-level BPE tokenizer
(``tokenizer.ggml.model == "gpt2"``) whose pre-tokenizer is ``smollm`` or plain ``gpt2``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store.gguf_tokenizer import build_tokenizer

__all__ = ["convert_gguf_to_hf"]

_ARCH = "llama"


@dataclass(frozen=True)
class _LlamaMeta:
    n_layer: int
    hidden: int
    ffn: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    context_length: int


def convert_gguf_to_hf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face Llama directory at ``out_dir`` and return it.

    The directory appears all at once (built beside ``out_dir`` and renamed into place), so an
    interrupted conversion never leaves a partial model behind. An existing ``out_dir`` is an
    error unless ``overwrite`` is set.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidRequestError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
    _check_destination(out_dir, overwrite=overwrite)
    reader = _open_reader(gguf_path)
    fields = _Fields(reader, gguf_path)
    arch = fields.get("general.architecture")
    if arch != _ARCH:
        raise ModelFormatError(
            f"{gguf_path} has architecture {arch!r}; Ember imports only 'llama' GGUF files "
            "(the Llama family, e.g. SmolLM2). Use a llama-architecture GGUF."
        )
    meta = _read_meta(fields)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ModelFormatError(f"{gguf_path} has no token_embd.weight tensor; not a full model")
    vocab_size = int(embedding.shape[-1])  # ggml order: (hidden, vocab)
    # The tokenizer is checked before the slow part, the tensors.
    tokenizer, tok_config, special_ids = build_tokenizer(
        fields.get, context_length=meta.context_length, vocab_size=vocab_size
    )
    tensors = _read_tensors(reader, meta, gguf_path, dtype=dtype, progress=progress)
    tied = "lm_head.weight" not in tensors
    config = _hf_config(meta, vocab_size=vocab_size, tied=tied, dtype=dtype, ids=special_ids)
    generation = {k: special_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir(out_dir) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tok_config)
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", generation)
        _publish(staging, out_dir, overwrite=overwrite)
    return out_dir


def _check_destination(out_dir: Path, *, overwrite: bool) -> None:
    # Checked before the (slow) conversion so a wrong path fails at once.
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidRequestError(
            f"{out_dir} already exists; remove it, choose another directory or pass overwrite=True"
        )


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelFormatError(f"GGUF file {path} does not exist; check the path")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/... on bad bytes
        raise ModelFormatError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {exc}); download it again"
        ) from exc
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ModelFormatError(
                f"{path} is truncated: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes; "
                "download it again"
            )
    return reader


class _Fields:
    """Typed access to GGUF metadata that turns absent or odd values into ModelFormatError."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self._reader = reader
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ModelFormatError(f"{self._path}: metadata {key} is unreadable ({exc})") from exc

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFormatError(
                f"{self._path} lacks required metadata {key}; it was not written by a llama.cpp "
                "converter Ember understands. Re-convert it with a recent llama.cpp."
            )
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default) if default is not None else self.require(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFormatError(f"{self._path}: metadata {key} = {value!r} is not a count")
        return value


def _read_meta(f: _Fields) -> _LlamaMeta:
    a = _ARCH
    hidden = f.integer(f"{a}.embedding_length")
    n_head = f.integer(f"{a}.attention.head_count")
    n_kv_head = f.integer(f"{a}.attention.head_count_kv", default=n_head)
    if hidden % n_head or n_head % n_kv_head:
        raise ModelFormatError(
            f"inconsistent attention shape: {hidden=} {n_head=} {n_kv_head=} "
            "(hidden must divide by heads, heads by kv heads)"
        )
    head_dim = f.integer(f"{a}.attention.key_length", default=hidden // n_head)
    if head_dim % 2:
        raise ModelFormatError(f"head dimension {head_dim} is odd; rotary embeddings need pairs")
    if f.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise ModelFormatError("attention.value_length differs from key_length; not a Llama")
    if f.get(f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise ModelFormatError("partial rotary embeddings (rope.dimension_count) are unsupported")
    if f.get(f"{a}.expert_count", 0):
        raise ModelFormatError("mixture-of-experts llama GGUFs (Mixtral) are not supported yet")
    return _LlamaMeta(
        n_layer=f.integer(f"{a}.block_count"),
        hidden=hidden,
        ffn=f.integer(f"{a}.feed_forward_length"),
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        rms_eps=_clean_float(f.require(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_theta=_clean_float(f.get(f"{a}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(f),
        context_length=f.integer(f"{a}.context_length", default=2048),
    )


def _rope_scaling(f: _Fields) -> dict[str, Any] | None:
    kind = f.get(f"{_ARCH}.rope.scaling.type", "none")
    factor = f.get(f"{_ARCH}.rope.scaling.factor", 1.0)
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _clean_float(factor)}
    raise ModelFormatError(f"rope scaling {kind!r} is not supported yet; only 'linear' is")


def _clean_float(value: Any) -> float:
    # GGUF stores float32; going through its shortest repr gives 1e-05, not 9.99999974e-06.
    return float(str(np.float32(value)))


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` (HF rotate-half layout -> interleaved pairs per head).

    llama.cpp does ``w.reshape(n_head, 2, d // n_head // 2, ...).swapaxes(1, 2)``; swapping the
    same two axes of the transposed view restores the original row order.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected_tensors(m: _LlamaMeta) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, HF shape) for every tensor a llama GGUF may hold."""
    q_rows, kv_rows = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
    layer: dict[str, tuple[str, tuple[int, ...]]] = {
        "attn_norm": ("input_layernorm", (m.hidden,)),
        "ffn_norm": ("post_attention_layernorm", (m.hidden,)),
        "attn_q": ("self_attn.q_proj", (q_rows, m.hidden)),
        "attn_k": ("self_attn.k_proj", (kv_rows, m.hidden)),
        "attn_v": ("self_attn.v_proj", (kv_rows, m.hidden)),
        "attn_output": ("self_attn.o_proj", (m.hidden, q_rows)),
        "ffn_gate": ("mlp.gate_proj", (m.ffn, m.hidden)),
        "ffn_up": ("mlp.up_proj", (m.ffn, m.hidden)),
        "ffn_down": ("mlp.down_proj", (m.hidden, m.ffn)),
    }
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "output_norm.weight": ("model.norm.weight", (m.hidden,))
    }
    for i in range(m.n_layer):
        for g_name, (hf_name, shape) in layer.items():
            out[f"blk.{i}.{g_name}.weight"] = (f"model.layers.{i}.{hf_name}.weight", shape)
    return out


def _read_tensors(
    reader: gguf.GGUFReader, m: _LlamaMeta, path: Path, *, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    expected = _expected_tensors(m)
    by_name = {t.name: t for t in reader.tensors}
    vocab = int(by_name["token_embd.weight"].shape[-1])
    expected["token_embd.weight"] = ("model.embed_tokens.weight", (vocab, m.hidden))
    expected["output.weight"] = ("lm_head.weight", (vocab, m.hidden))
    missing = sorted(set(expected) - set(by_name) - {"output.weight"})
    if missing:
        raise ModelFormatError(f"{path} is missing tensors {missing[:5]} ({len(missing)} in all)")
    extra = sorted(set(by_name) - set(expected))
    if extra:
        hint = " (llama-3 rope frequencies)" if "rope_freqs.weight" in extra else ""
        raise ModelFormatError(
            f"{path} holds tensors Ember cannot map to a Llama{hint}: {extra[:5]}; "
            "this GGUF variant is not supported"
        )
    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
        hf_name, shape = expected[t.name]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelFormatError(
                f"{t.name} uses {t.tensor_type.name}, which this gguf library cannot dequantize; "
                "upgrade the gguf package or use another quantization"
            ) from exc
        if tuple(arr.shape) != shape:
            raise ModelFormatError(
                f"{t.name} has shape {tuple(arr.shape)}, expected {shape} from the metadata"
            )
        if t.name.endswith(".attn_q.weight"):
            arr = _unpermute_rope_rows(arr, m.n_head)
        elif t.name.endswith(".attn_k.weight"):
            arr = _unpermute_rope_rows(arr, m.n_kv_head)
        # Copy out of the memory map: the file must not stay pinned by the result.
        out[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(dtype).contiguous()
    return out


def _hf_config(
    m: _LlamaMeta, *, vocab_size: int, tied: bool, dtype: torch.dtype, ids: dict[str, int | None]
) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling:
        rope.update(m.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden,
        "intermediate_size": m.ffn,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_eps,
        # rope_theta/rope_scaling for older readers, rope_parameters for transformers >= 5.
        "rope_theta": m.rope_theta,
        "rope_scaling": m.rope_scaling,
        "rope_parameters": rope,
        "max_position_embeddings": m.context_length,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": ids.get("bos_token_id"),
        "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden directory beside ``out_dir``, removed whatever happens unless published."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    # mkdtemp makes 0700 and safetensors writes 0600; other worker processes must read the model.
    staging.chmod(0o755)
    for item in staging.iterdir():
        item.chmod(0o644)
        _fsync(item)
    if overwrite and out_dir.exists():
        # Move the old directory aside first: rename cannot replace a non-empty directory.
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(staging, out_dir)
    except OSError as exc:
        raise InvalidRequestError(
            f"{out_dir} appeared while converting (another import?); remove it and retry"
        ) from exc


def _fsync(path: Path) -> None:
    # Data reaches the disk before the rename makes the directory visible.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
