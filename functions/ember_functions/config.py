"""Model architecture config, read from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family: Llama 2/3 (with llama3 RoPE scaling),
Mistral, Qwen2 (q/k/v bias) and SmolLM2. Anything we cannot run faithfully is
rejected here, at load time, rather than producing subtly wrong tokens later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember_core import ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is ``"llama3"`` or ``"linear"``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}); check the model's config.json"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """Longest sequence we run exactly.

        A sliding window only changes attention beyond the window, so capping the
        context at it keeps Mistral v0.1 exact without a windowed kernel.
        """
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_params(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
        )
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + head

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        model_type = str(hf.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"model_type {model_type!r} is not supported; Ember runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        if hf.get("mlp_bias"):
            raise ModelFormatError(
                "mlp_bias: true is not supported; Ember runs Llama-family MLPs without bias"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFormatError(f"hidden_act {act!r} is not supported; only 'silu' is")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            cfg = cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(hf),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                rope_scaling=_parse_rope_scaling(hf),
                sliding_window=_sliding_window(hf, model_type),
            )
        except KeyError as exc:
            raise ModelFormatError(
                f"config.json lacks required field {exc.args[0]!r}; is this a Hugging Face "
                "Llama-family config?"
            ) from None
        return cfg

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / "config.json"
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelFormatError(
                f"{path} not found; a model directory needs config.json"
            ) from None
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None


def _rope_theta(hf: Mapping[str, Any]) -> float:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs keep
    # `rope_theta` and `rope_scaling` at the top level. Both are read.
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _parse_rope_scaling(hf: Mapping[str, Any]) -> RopeScaling | None:
    raw = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    raise ModelFormatError(
        f"rope_scaling type {kind!r} is not supported; supported: llama3, linear"
    )


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> int | None:
    window = hf.get("sliding_window")
    if not window:
        return None
    # Qwen2 configs carry a sliding_window that only applies with use_sliding_window.
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return int(window)
