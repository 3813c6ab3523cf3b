"""A ~1.1B-parameter random-init Llama checkpoint (TinyLlama's shapes), built from a seed.

Weights are normal(0, 0.02) in bfloat16, as a freshly initialized model's would be; norms
are ones. It is written as a Hugging Face directory with two safetensors shards and an index,
so every loader in the bench reads the layout it would meet on the hub. Kept out of git
(``.cache/``); built once and reused while its config matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHARDS = 2


def _shapes() -> dict[str, tuple[int, ...]]:
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = h // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def build(path: Path, *, seed: int = 0, with_tokenizer: bool = False) -> Path:
    """Writes the checkpoint to ``path`` unless an identical one is there; returns ``path``.
    ``with_tokenizer`` adds a byte-level tokenizer (ids < 259, inside the vocabulary), for
    benchmarks that serve the model rather than only load its weights."""
    config_path = path / "config.json"
    if not (config_path.is_file() and json.loads(config_path.read_text()) == CONFIG):
        _write(path, seed)
    if with_tokenizer and not (path / "tokenizer.json").is_file():
        from ember_functions.tiny import write_byte_tokenizer

        write_byte_tokenizer(path, max_length=int(CONFIG["max_position_embeddings"]))
    return path


def _write(path: Path, seed: int) -> None:
    config_path = path / "config.json"
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes()
    names = list(shapes)
    per_shard = -(-len(names) // SHARDS)
    weight_map = {}
    for s in range(SHARDS):
        fname = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        shard = {}
        for name in names[s * per_shard : (s + 1) * per_shard]:
            shape = shapes[name]
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(shard, str(path / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config_path.write_text(json.dumps(CONFIG))  # last: its presence means "complete"


def num_params() -> int:
    total = 0
    for shape in _shapes().values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


if __name__ == "__main__":
    print(f"{num_params() / 1e9:.2f}B parameters")
