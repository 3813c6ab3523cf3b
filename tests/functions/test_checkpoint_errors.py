"""Checkpoints Ember cannot run faithfully are refused at load, with what is wrong: an
unsupported architecture, activation or RoPE scaling, tensors missing, left over or of the
wrong shape, a config that does not add up, a truncated file or a missing shard; and
engine settings that make no sense are refused at construction."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ember_core import ConfigError, ModelFormatError
from ember_functions.config import ModelConfig
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.weights import load_model

from .conftest import edit_config, edit_weights

CPU = torch.device("cpu")


def test_unsupported_model_type(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, model_type="gpt2")
    with pytest.raises(ModelFormatError) as err:
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))
    assert "'gpt2'" in err.value.message
    assert "llama" in err.value.message and "qwen2" in err.value.message


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unknown_rope_scaling_type(key: str, copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, **{key: {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelFormatError) as err:
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))
    assert "'yarn'" in err.value.message
    assert "llama3" in err.value.message and "linear" in err.value.message


def test_unsupported_activation(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, hidden_act="gelu")
    with pytest.raises(ModelFormatError, match="'gelu'"):
        ModelConfig.from_dir(model_dir)


def test_missing_tensor(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_weights(model_dir, lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelFormatError) as err:
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))
    assert "layers.1.mlp.down_proj.weight" in err.value.message


def test_missing_lm_head_when_not_tied(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_weights(model_dir, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ModelFormatError, match="lm_head"):
        load_model(model_dir, dtype=torch.float32, device=CPU)


def test_shape_mismatch_between_config_and_weights(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, intermediate_size=128)  # the checkpoint has 160
    with pytest.raises(ModelFormatError) as err:
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))
    msg = err.value.message
    assert "gate_up_weight" in msg or "down_weight" in msg
    assert "(320, 64)" in msg or "(64, 160)" in msg  # what the checkpoint holds
    assert "(256, 64)" in msg or "(64, 128)" in msg  # what config.json implies


def test_heads_not_a_multiple_of_kv_heads(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, num_key_value_heads=3)
    with pytest.raises(ModelFormatError, match="multiple"):
        ModelConfig.from_dir(model_dir)


def test_missing_config_field_and_files(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, hidden_size=None)
    with pytest.raises(ModelFormatError, match="hidden_size"):
        ModelConfig.from_dir(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        ModelConfig.from_dir(model_dir)
    empty = copy_model("qwen2")
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_model(empty, dtype=torch.float32, device=CPU)


def test_engine_config_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="'int8'"):
        EngineConfig(dtype="int8")
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=-1)
    with pytest.raises(ConfigError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ConfigError, match="pack_min_free_bytes"):
        EngineConfig(pack_min_free_bytes=-1)
    assert EngineConfig(pack_min_free_bytes=0).pack_min_free_bytes == 0
    with pytest.raises(ConfigError, match="blok_size"):
        EngineConfig.from_dict({"blok_size": 8})
    assert EngineConfig.from_dict({"block_size": 8}).block_size == 8


def test_truncated_weights_file_is_a_model_format_error(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))


def test_missing_shard_is_a_model_format_error(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="model-00002-of-00002"):
        LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=8))
