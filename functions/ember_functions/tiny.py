"""Deterministic tiny random models, for tests and demos that need no download.

``write_tiny_model(dir, family="qwen2", seed=3)`` writes a complete Hugging Face
model directory (config, safetensors, byte-level tokenizer, ChatML template) that
both Ember and ``transformers`` load. The same seed always gives the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ember_core import InvalidRequestError

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "smollm2")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(family: str, *, vocab_size: int = 320) -> dict[str, Any]:
    if family not in FAMILIES:
        raise InvalidRequestError(f"unknown tiny family {family!r}; pick one of {FAMILIES}")
    base: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 256,
        "eos_token_id": 258,
        "torch_dtype": "float32",
    }
    if family == "llama3":
        base["rope_theta"] = 500000.0
        base["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    elif family == "mistral":
        base.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    elif family == "qwen2":
        base.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            attention_bias=True,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        )
        base.pop("head_dim")
    elif family == "smollm2":
        base.update(tie_word_embeddings=True, num_key_value_heads=1, rope_theta=100000.0)
    return base


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges: 256 byte tokens plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def _random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads

    def w(*shape: int, std: float = 0.15) -> torch.Tensor:
        # Larger than a real init on purpose: peaked logits make greedy decoding stable
        # against float rounding, so token-for-token comparisons are meaningful.
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    out = {"model.embed_tokens.weight": w(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        out[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        out[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        if config["attention_bias"]:
            out[p + "self_attn.q_proj.bias"] = w(heads * head_dim, std=0.1)
            out[p + "self_attn.k_proj.bias"] = w(kv_heads * head_dim, std=0.1)
            out[p + "self_attn.v_proj.bias"] = w(kv_heads * head_dim, std=0.1)
        out[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        out[p + "mlp.up_proj.weight"] = w(inter, hidden)
        out[p + "mlp.down_proj.weight"] = w(hidden, inter)
        out[p + "input_layernorm.weight"] = norm(hidden)
        out[p + "post_attention_layernorm.weight"] = norm(hidden)
    out["model.norm.weight"] = norm(hidden)
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = w(config["vocab_size"], hidden)
    return out


def write_byte_tokenizer(model_dir: Path, *, max_length: int) -> None:
    """Writes :func:`byte_tokenizer` and a ChatML template into ``model_dir``: for models
    built from a seed (tests, benchmarks), which come without a tokenizer."""
    byte_tokenizer().save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "chat_template": CHATML,
                "model_max_length": max_length,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
    (model_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 256, "eos_token_id": 258})
    )


def write_tiny_model(
    out_dir: Path, *, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Writes a tiny random ``family`` model to ``out_dir`` (replaced atomically)."""
    config = tiny_config(family)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    weights = {k: v.to(dtype).contiguous() for k, v in _random_weights(config, seed).items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(tmp, max_length=config["max_position_embeddings"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
