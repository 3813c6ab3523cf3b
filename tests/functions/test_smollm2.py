"""The real default model through the engine (slow: 270 MB of bf16 weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_smollm2_answers_the_capital_of_france(smollm2_dir: Path, dtype: str) -> None:
    engine = LLMEngine.from_dir(
        smollm2_dir, config=EngineConfig(dtype=dtype, num_kv_blocks=64, max_num_seqs=4)
    )
    [answer] = engine.generate([QUESTION], SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop"
    assert answer.usage.completion_tokens == len(answer.token_ids) <= 32
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.slow
def test_smollm2_batched_greedy_matches_single_requests(smollm2_dir: Path) -> None:
    engine = LLMEngine.from_dir(
        smollm2_dir, config=EngineConfig(dtype="float32", num_kv_blocks=128)
    )
    prompts = [
        [{"role": "user", "content": q}]
        for q in ("What is 2 + 2?", "Name a color.", "What is the capital of France?")
    ]
    params = SamplingParams(temperature=0, max_tokens=24)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
