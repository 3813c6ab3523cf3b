"""The projection kernel policy: float32 compute, bf16 copies for single-row decode,
and packed (oneDNN-blocked) matrices wherever oneDNN runs the compute dtype."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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


def test_a_matrix_left_unconverted_is_converted_per_call_to_the_bit() -> None:
    g = torch.Generator().manual_seed(2)
    lin = Linear(device=CPU, dtype=torch.float32)
    small, large = (torch.randn(s, generator=g).bfloat16() for s in ((8, 16), (48, 16)))
    for gemv in (large, small, large):  # the scratch grows once, then is reused
        meta = torch.empty(gemv.shape, device="meta")
        for rows in (2, 14):
            x = torch.randn(rows, 16, generator=g)
            assert torch.equal(lin(x, meta, None, gemv), lin(x, gemv.float()))
    assert lin._scratch.numel() == large.numel()
    with pytest.raises(RuntimeError, match="single-row copy"):
        lin(torch.randn(2, 16), torch.empty(8, 16, device="meta"))


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


def _packs(dtype: torch.dtype) -> bool:
    return Linear(device=CPU, dtype=dtype).packs


PACKING_DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not _packs(dtype), reason=f"this CPU or torch build cannot pack {dtype} (no oneDNN)"
        ),
        id=str(dtype).removeprefix("torch."),
    )
    for dtype in (torch.bfloat16, torch.float32)
]


@pytest.mark.parametrize("dtype", PACKING_DTYPES)
def test_packed_matrices_give_what_the_plain_ones_give(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    lin = Linear(device=CPU, dtype=dtype)
    packed = lin.pack(w)
    assert packed is not None and packed.is_mkldnn
    tol = {"atol": 0.1, "rtol": 0.02} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for rows in (1, 5, 512):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(lin(x, w, b, None, packed).float(), ref, **tol)
        torch.testing.assert_close(lin(x, w, None, None, packed), lin(x, w), **tol)


@pytest.mark.skipif(not _packs(torch.float32), reason="this torch build cannot pack float32")
def test_a_packed_float32_row_does_not_depend_on_the_rows_beside_it() -> None:
    """What keeps dtype="float32" batch-invariant once a worker has packed: row i of a
    packed product is bit-identical whether 1, 37 or 600 rows are multiplied."""
    g = torch.Generator().manual_seed(3)
    lin = Linear(device=CPU, dtype=torch.float32)
    w = torch.randn(3072, 576, generator=g)
    packed = lin.pack(w)
    x = torch.randn(600, 576, generator=g)
    full = lin(x, w, None, None, packed)
    for rows in (1, 2, 17, 37, 128, 512):
        assert torch.equal(lin(x[:rows], w, None, None, packed), full[:rows]), rows


def test_float16_is_not_packed() -> None:
    lin = Linear(device=CPU, dtype=torch.float16)
    assert lin.pack(torch.randn(8, 8).half()) is None


@pytest.mark.parametrize("dtype", PACKING_DTYPES)
def test_an_engine_packs_a_layer_at_a_time_and_generates_the_same_tokens(
    tiny_model: Callable[..., Path], dtype: torch.dtype
) -> None:
    model_dir = tiny_model("llama", torch.bfloat16)
    name = str(dtype).removeprefix("torch.")
    engine = LLMEngine.from_dir(model_dir, config=EngineConfig(num_kv_blocks=32, dtype=name))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    before = [o.token_ids for o in engine.generate(prompts, params)]
    layers = engine.model.config.num_layers
    for done in range(1, layers + 1):  # every layer, then the LM head
        mats = engine.model.decoder_layers[done - 1].matrices().values()
        assert engine.packing.next_bytes() == sum(m.numel() * m.element_size() for m in mats)
        assert engine.packing.pack(max_layers=1) is False
        assert set(engine.model.decoder_layers[done - 1].packed) == {"qkv", "o", "gate_up", "down"}
    assert engine.model.head_packed is None
    head = engine.model.head
    assert engine.packing.next_bytes() == head.numel() * head.element_size()
    assert engine.packing.pack(max_layers=1) is True
    assert engine.model.head_packed is not None
    assert engine.packing.pack() is True  # nothing left
    assert engine.packing.next_bytes() == 0
    after = [o.token_ids for o in engine.generate(prompts, params)]
    assert after == before

    # Given back last packed first (the LM head, then the last layer), each freeing what
    # packing it took; the model runs the same whatever is packed.
    assert engine.packing.unpack() == head.numel() * head.element_size()
    assert engine.model.head_packed is None and engine.packing.units == layers
    last = engine.model.decoder_layers[-1]
    assert engine.packing.unpack() == sum(
        m.numel() * m.element_size() for m in last.matrices().values()
    )
    assert not last.packed and engine.model.decoder_layers[0].packed
    assert [o.token_ids for o in engine.generate(prompts, params)] == before
    while engine.packing.unpack():
        pass
    assert engine.packing.units == 0 and engine.packing.unpack() == 0
    assert not any(layer.packed for layer in engine.model.decoder_layers)
    assert [o.token_ids for o in engine.generate(prompts, params)] == before


def test_packing_can_be_turned_off(tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model("llama", torch.bfloat16)
    config = EngineConfig(num_kv_blocks=16, dtype="bfloat16", pack_weights=False)
    engine = LLMEngine.from_dir(model_dir, config=config)
    assert engine.packing.next_bytes() == 0
    assert engine.packing.pack() is True
    assert engine.model.head_packed is None
    assert all(not layer.packed for layer in engine.model.decoder_layers)
