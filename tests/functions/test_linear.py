"""The projection kernel policy: float32 compute, bf16 copies for single-row decode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.linear import Linear
from ember_functions.sampling_params import SamplingParams

CPU = torch.device("cpu")


def test_linear_matches_reference_with_and_without_bias() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    lin = Linear(device=CPU, dtype=torch.float32)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 16, generator=g)
        torch.testing.assert_close(lin(x, w, b), torch.nn.functional.linear(x, w, b))
        torch.testing.assert_close(lin(x, w), x @ w.T)


def test_single_row_uses_the_low_precision_copy() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g).bfloat16().float()  # bf16-exact values
    gemv = w.bfloat16()
    lin = Linear(device=CPU, dtype=torch.float32)
    x = torch.randn(1, 16, generator=g)
    expected = torch.nn.functional.linear(x.bfloat16(), gemv).float()
    assert torch.equal(lin(x, w, None, gemv), expected)
    x2 = torch.randn(2, 16, generator=g)  # two rows: float32 weights, full precision
    torch.testing.assert_close(lin(x2, w, None, gemv), x2 @ w.T)


def test_auto_dtype_keeps_bf16_copies_only_for_bf16_checkpoints(
    tiny_model: Callable[..., Path],
) -> None:
    bf16_dir = tiny_model("llama", torch.bfloat16)
    auto = LLMEngine.from_dir(bf16_dir, config=EngineConfig(num_kv_blocks=16))
    exact = LLMEngine.from_dir(bf16_dir, config=EngineConfig(num_kv_blocks=16, dtype="float32"))
    if auto.model.dtype == torch.float32:  # a CPU without native bf16, like CI's
        assert auto.model.head_gemv is not None and auto.model.head_gemv.dtype == torch.bfloat16
        assert auto.model.decode_bytes_per_token() < exact.model.decode_bytes_per_token()
    assert exact.model.head_gemv is None
    fp32 = LLMEngine.from_dir(tiny_model("llama"), config=EngineConfig(num_kv_blocks=16))
    assert fp32.model.head_gemv is None
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [out] = auto.generate([[5, 6, 7]], params)
    assert len(out.token_ids) == 8


def test_from_the_store_fused_bf16_copies_are_views_of_the_loaded_buffers(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """The store lays q/k/v and gate/up side by side, so binding a bf16 checkpoint makes
    no 16-bit copies: the decode matrices are the loaded buffers. Same tokens either way."""
    from ember_weights_store import ModelCatalog

    bf16_dir = tiny_model("llama", torch.bfloat16)
    catalog = ModelCatalog(tmp_path)
    catalog.store().import_hf_dir(bf16_dir, model_id="tiny-bf16")
    config = EngineConfig(num_kv_blocks=16)
    stored = LLMEngine.from_store(
        catalog.store(), "tiny-bf16", config=config, tokenizer_cache=tmp_path / "tok"
    )
    direct = LLMEngine.from_dir(bf16_dir, config=config)
    if stored.model.dtype != torch.float32:
        return  # a CPU computing in bf16 keeps no decode copies to share
    layer = stored.model.decoder_layers[0]
    base = layer.gemv["qkv"]._base
    assert base is not None, "the fused bf16 qkv was copied, not viewed"
    assert layer.gemv["o"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert direct.model.decoder_layers[0].gemv["qkv"]._base is None  # files: concatenated
    assert torch.equal(layer.gemv["qkv"], direct.model.decoder_layers[0].gemv["qkv"])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [[3, 14, 15, 92, 65]]
    assert (
        stored.generate(prompt, params)[0].token_ids == direct.generate(prompt, params)[0].token_ids
    )
