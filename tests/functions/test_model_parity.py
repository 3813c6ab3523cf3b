"""Our Llama-family model against transformers (load-time rejection of models we cannot
run faithfully: ``test_checkpoint_errors.py``).

Every tiny family (llama, llama3 RoPE scaling, mistral, qwen2 q/k/v bias + tied
embeddings, smollm2 MQA + tied embeddings) must give transformers' logits within 1e-4
in float32, through a plain prefill, the paged decode path, chunked prefill and
prefix-cache hits alike.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ember_core import ConfigError, ContextLengthError, ModelFormatError
from ember_functions.attention import AttentionBatch, KVCache, PrefillChunk
from ember_functions.engine import LLMEngine
from ember_functions.model import LlamaModel
from ember_functions.sampling_params import SamplingParams
from ember_functions.scheduler import SchedulerOutput
from ember_functions.tiny import FAMILIES
from ember_functions.weights import cpu_has_native_bf16, load_model, resolve_compute_dtype

from .conftest import edit_config, edit_weights
from .random_prompts import prompt_ids

ATOL = 1e-4
CPU = torch.device("cpu")
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

HFModel = Any  # transformers' PreTrainedModel; untyped


# -- helpers ------------------------------------------------------------------------------


def load_hf(model_dir: Path) -> HFModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Our reference for ``ignore_eos=True``: EOS is an ordinary token that ends nothing.
    # (min_new_tokens would instead forbid it, and pick the runner-up where we pick EOS.)
    model.generation_config.eos_token_id = None
    return model


def hf_logits(model: HFModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()  # [T, vocab]


def hf_greedy(model: HFModel, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=256,
        )
    return list(out[0, len(ids) :].tolist())


def prefill_logits(model: LlamaModel, ids: list[int], *, block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one plain prefill, built directly on AttentionBatch."""
    cfg = model.config
    t = len(ids)
    kv = KVCache(
        num_layers=cfg.num_layers,
        num_blocks=-(-t // block_size),
        block_size=block_size,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=model.dtype,
        device=CPU,
    )
    batch = AttentionBatch(
        slot_mapping=torch.arange(t),
        num_decodes=0,
        decode_slots=None,
        decode_mask=None,
        prefills=[PrefillChunk(0, t, None, None)],
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(t), kv, batch)
        return model.logits(hidden)


def capture_logits(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records, per request id, the logits row every sampled token was drawn from."""
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    original = engine.sampler.sample

    def sample(logits: torch.Tensor, params: list, request_ids: list[str]) -> list[int]:
        for row, rid in zip(logits, request_ids, strict=True):
            captured[rid].append(row.clone())
        return original(logits, params, request_ids)

    monkeypatch.setattr(engine.sampler, "sample", sample)
    return captured


def record_steps(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple]]:
    """Records each executed step as [(request_id, start_pos, num_tokens), ...]."""
    steps: list[list[tuple]] = []
    original = engine.runner.execute

    def execute(plan: SchedulerOutput) -> Any:
        steps.append([(c.seq.request_id, c.start_pos, c.num_tokens) for c in plan.chunks])
        return original(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    return steps


def assert_step_logits_match(
    hf: HFModel, ids: list[int], output: list[int], rows: list[torch.Tensor]
) -> None:
    """The k-th sampled row must equal transformers' logits at position len(ids)-1+k."""
    assert len(rows) == len(output)
    ref = hf_logits(hf, ids + output[:-1])
    for k, row in enumerate(rows):
        diff = (row - ref[len(ids) - 1 + k]).abs().max().item()
        assert diff <= ATOL, f"logits of generated token {k} differ from transformers by {diff}"


@pytest.fixture(scope="module")
def hf_model(tiny_model: Callable[..., Path]) -> Callable[[str], HFModel]:
    cache: dict[str, HFModel] = {}

    def get(family: str) -> HFModel:
        if family not in cache:
            cache[family] = load_hf(tiny_model(family))
        return cache[family]

    return get


# -- float32 parity -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers_at_every_position(
    family: str, tiny_model: Callable[..., Path], hf_model: Callable[[str], HFModel]
) -> None:
    model = load_model(tiny_model(family), dtype=torch.float32, device=CPU)
    for seed, length in ((1, 1), (2, 17), (3, 70)):
        ids = prompt_ids(seed, length)
        ours = prefill_logits(model, ids)
        ref = hf_logits(hf_model(family), ids)
        assert ours.shape == ref.shape == (length, model.config.vocab_size)
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"{family}, {length} tokens: max |logit diff| {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_and_decode_logits_match_transformers(
    family: str,
    make_engine: Callable[..., LLMEngine],
    hf_model: Callable[[str], HFModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(family)
    captured = capture_logits(engine, monkeypatch)
    ids = prompt_ids(10, 23)
    [out] = engine.generate([ids], GREEDY_32)
    assert out.finish_reason == "length"
    assert out.token_ids == hf_greedy(hf_model(family), ids, 32)
    # The first row comes from the prefill, the other 31 from paged decodes.
    assert_step_logits_match(hf_model(family), ids, out.token_ids, captured[out.request_id])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_transformers(
    family: str,
    make_engine: Callable[..., LLMEngine],
    hf_model: Callable[[str], HFModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(family, block_size=4, max_num_batched_tokens=8)
    captured = capture_logits(engine, monkeypatch)
    steps = record_steps(engine, monkeypatch)
    ids = prompt_ids(11, 37)
    [out] = engine.generate([ids], GREEDY_32)
    rid = out.request_id
    # 37 prompt tokens in chunks of at most 8; chunk boundaries fall inside blocks too.
    assert [s[0] for s in steps[:5]] == [
        (rid, 0, 8),
        (rid, 8, 8),
        (rid, 16, 8),
        (rid, 24, 8),
        (rid, 32, 5),
    ]
    assert all(sum(n for _, _, n in step) <= 8 for step in steps)
    assert out.token_ids == hf_greedy(hf_model(family), ids, 32)
    assert_step_logits_match(hf_model(family), ids, out.token_ids, captured[rid])


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hit_gives_identical_tokens(
    family: str,
    make_engine: Callable[..., LLMEngine],
    hf_model: Callable[[str], HFModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(family, block_size=4)
    captured = capture_logits(engine, monkeypatch)
    ids = prompt_ids(12, 37)
    [first] = engine.generate([ids], GREEDY_32)
    [second] = engine.generate([ids], GREEDY_32)
    assert first.usage.cached_tokens == 0
    # Every full block but the one holding the last prompt token is reused.
    assert second.usage.cached_tokens == 36
    assert second.usage.prompt_tokens == 37
    assert second.token_ids == first.token_ids == hf_greedy(hf_model(family), ids, 32)
    assert_step_logits_match(hf_model(family), ids, second.token_ids, captured[second.request_id])

    # A prompt sharing only its first 22 tokens reuses 5 blocks and attends over them
    # with an offset causal mask.
    other = ids[:22] + prompt_ids(13, 15)
    [third] = engine.generate([other], GREEDY_32)
    assert third.usage.cached_tokens == 20
    assert third.token_ids == hf_greedy(hf_model(family), other, 32)
    assert_step_logits_match(hf_model(family), other, third.token_ids, captured[third.request_id])


def test_prefix_shared_with_a_running_sequence(
    make_engine: Callable[..., LLMEngine], hf_model: Callable[[str], HFModel]
) -> None:
    """A request that hits blocks a running sequence still holds shares them safely."""
    engine = make_engine("llama", block_size=4)
    ids = prompt_ids(14, 30)
    first = engine.add_request(ids, GREEDY_32)
    outputs: dict[str, list[int]] = defaultdict(list)
    usage = {}
    for out in engine.step():  # prefill of the first request: its 7 full blocks commit
        outputs[out.request_id] += out.token_ids
    second = engine.add_request(ids, GREEDY_32)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
            usage[out.request_id] = out.usage
    assert usage[second].cached_tokens == 28
    expected = hf_greedy(hf_model("llama"), ids, 32)
    assert outputs[first] == outputs[second] == expected


def test_linear_rope_scaling_matches_transformers(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    plain = load_model(model_dir, dtype=torch.float32, device=CPU)
    edit_config(model_dir, rope_scaling={"rope_type": "linear", "factor": 4.0})
    scaled = load_model(model_dir, dtype=torch.float32, device=CPU)
    hf = load_hf(model_dir)
    ids = prompt_ids(15, 40)
    ours = prefill_logits(scaled, ids)
    assert (ours - hf_logits(hf, ids)).abs().max().item() <= ATOL
    # ...and the scaling really changed something.
    assert (ours - prefill_logits(plain, ids)).abs().max().item() > 1e-2


def test_sharded_checkpoint_loads_like_a_single_file(
    tiny_model: Callable[..., Path], copy_model: Callable[..., Path]
) -> None:
    model_dir = copy_model("qwen2")
    weights = load_file(str(model_dir / "model.safetensors"))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(model_dir / file), metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = prompt_ids(16, 20)
    sharded = prefill_logits(load_model(model_dir, dtype=torch.float32, device=CPU), ids)
    single = prefill_logits(load_model(tiny_model("qwen2"), dtype=torch.float32, device=CPU), ids)
    assert torch.equal(sharded, single)


# -- bfloat16 ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_loads_and_generates(
    family: str,
    make_engine: Callable[..., LLMEngine],
    hf_model: Callable[[str], HFModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(family, dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16
    assert engine.kv_cache.data.dtype == torch.bfloat16
    captured = capture_logits(engine, monkeypatch)
    ids = prompt_ids(17, 19)
    [out] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert out.finish_reason == "length"
    assert len(out.token_ids) == out.usage.completion_tokens == 20
    assert all(0 <= t < engine.model.config.vocab_size for t in out.token_ids)
    # bf16 is approximate, but the first token's logits stay close to float32's.
    first = captured[out.request_id][0]
    ref = hf_logits(hf_model(family), ids)[-1]
    assert first.dtype == torch.float32
    assert (first - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


def test_bfloat16_checkpoint_with_auto_dtype(
    tiny_model: Callable[..., Path], make_engine: Callable[..., LLMEngine]
) -> None:
    model_dir = tiny_model("llama", torch.bfloat16)
    engine = make_engine(model_dir=model_dir, dtype="auto")
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert engine.model.dtype == expected
    [out] = engine.generate([prompt_ids(18, 10)], SamplingParams(temperature=0, max_tokens=8))
    assert out.usage.completion_tokens == len(out.token_ids) >= 1
    if expected == torch.float32:  # bf16 weights computed in float32: exact parity
        hf = load_hf(model_dir)
        ids = prompt_ids(19, 25)
        diff = (prefill_logits(engine.model, ids) - hf_logits(hf, ids)).abs().max().item()
        assert diff <= ATOL


def test_resolve_compute_dtype() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    assert resolve_compute_dtype("float16", weights_dtype=f32, device=CPU) == torch.float16
    assert resolve_compute_dtype("auto", weights_dtype=f32, device=CPU) == f32
    cuda = torch.device("cuda")
    assert resolve_compute_dtype("auto", weights_dtype=f32, device=cuda) == bf16
    assert resolve_compute_dtype("auto", weights_dtype=torch.float16, device=cuda) == torch.float16
    with pytest.raises(ConfigError, match="'int8'"):
        resolve_compute_dtype("int8", weights_dtype=f32, device=CPU)


def test_bf16_asked_for_where_it_is_emulated_is_computed_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ember_functions.weights as weights

    weights._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="ember_functions.weights"):
        for _ in range(2):
            got = resolve_compute_dtype("bfloat16", weights_dtype=torch.bfloat16, device=CPU)
            assert got == torch.bfloat16  # what was asked for, slow or not
    (record,) = caplog.records  # once per process
    assert "emulates" in record.getMessage() and "dtype='auto'" in record.getMessage()
    weights._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: True)
    caplog.clear()
    resolve_compute_dtype("bfloat16", weights_dtype=torch.bfloat16, device=CPU)
    assert not caplog.records


# -- models and settings we refuse ---------------------------------------------------------


def test_mistral_sliding_window_caps_the_context(
    copy_model: Callable[..., Path], make_engine: Callable[..., LLMEngine]
) -> None:
    model_dir = copy_model("mistral")
    edit_config(model_dir, sliding_window=48)
    engine = make_engine(model_dir=model_dir)
    assert engine.max_context == 48
    with pytest.raises(ContextLengthError, match="48"):
        engine.add_request(prompt_ids(20, 48), SamplingParams(max_tokens=None))
    # Up to the window, attention is exact: still equal to transformers.
    hf = load_hf(model_dir)
    ids = prompt_ids(21, 40)
    [out] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == hf_greedy(hf, ids, 8)


# -- bugs ------------------------------------------------------------------------------


def test_llama_attention_bias_is_run_or_rejected(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, attention_bias=True)
    g = torch.Generator().manual_seed(0)

    def add_biases(w: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            for name, size in (("q", 64), ("k", 32), ("v", 32), ("o", 64)):
                w[f"model.layers.{i}.self_attn.{name}_proj.bias"] = 0.3 * torch.randn(
                    size, generator=g
                )

    edit_weights(model_dir, add_biases)
    try:
        model = load_model(model_dir, dtype=torch.float32, device=CPU)
    except ModelFormatError:
        return  # refusing the model is acceptable
    hf = load_hf(model_dir)
    ids = prompt_ids(22, 20)
    diff = (prefill_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= ATOL, f"loaded a model we cannot run: logits differ by {diff}"


def test_llama_mlp_bias_is_run_or_rejected(copy_model: Callable[..., Path]) -> None:
    model_dir = copy_model("llama")
    edit_config(model_dir, mlp_bias=True)
    g = torch.Generator().manual_seed(0)

    def add_biases(w: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            for name, size in (("gate", 160), ("up", 160), ("down", 64)):
                w[f"model.layers.{i}.mlp.{name}_proj.bias"] = 0.3 * torch.randn(size, generator=g)

    edit_weights(model_dir, add_biases)
    try:
        model = load_model(model_dir, dtype=torch.float32, device=CPU)
    except ModelFormatError:
        return
    hf = load_hf(model_dir)
    ids = prompt_ids(23, 20)
    diff = (prefill_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= ATOL, f"loaded a model we cannot run: logits differ by {diff}"
