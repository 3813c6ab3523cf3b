"""The public prefix: a chat template's preamble, cached once by an idle engine and
shared by every tenant's chat requests, with the same tokens as computing it afresh."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ember_functions.engine import LLMEngine
from ember_functions.sampling_params import SamplingParams
from ember_functions.service import EngineService
from ember_functions.tokenizer import Tokenizer

EngineFactory = Callable[..., LLMEngine]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = "You are a careful assistant that answers in one short sentence."
# SmolLM2's shape: a default system prompt unless the chat brings its own.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def with_template(model_dir: Path, template: str) -> Path:
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return model_dir


@pytest.fixture
def system_model(copy_model: Callable[..., Path]) -> Path:
    return with_template(copy_model("llama"), TEMPLATE)


def chat(text: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": text}]


def run(engine: LLMEngine, prompt: object, salt: str) -> tuple[list[int], int]:
    """(tokens, cached prompt tokens) of one greedy request."""
    engine.enqueue(engine.make_request(prompt, GREEDY, cache_salt=salt))  # type: ignore[arg-type]
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return [t for o in outs for t in o.token_ids], outs[-1].usage.cached_tokens


def test_the_preamble_is_what_every_one_message_chat_starts_with(system_model: Path) -> None:
    tok = Tokenizer.from_dir(system_model)
    preamble = tok.chat_preamble()
    text = tok.decode(preamble, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n" + SYSTEM + "<|im_end|>")
    for message in ("Hello", "42", "  spaced", "?!"):
        assert tok.encode_chat(chat(message))[: len(preamble)] == preamble
    # Without a default system prompt only the role marker is common.
    plain = Tokenizer.from_dir(with_template(system_model, TEMPLATE.replace(SYSTEM, "")))
    assert len(plain.chat_preamble()) < len(preamble)


def test_a_template_that_refuses_a_lone_user_message_has_no_preamble(system_model: Path) -> None:
    refusing = "{{ raise_exception('a system message must come first') }}"
    assert Tokenizer.from_dir(with_template(system_model, refusing)).chat_preamble() == []


def test_tenants_share_the_cached_preamble_and_get_the_tokens_of_a_fresh_prefill(
    make_engine: EngineFactory, system_model: Path
) -> None:
    engine = make_engine(model_dir=system_model, block_size=16)
    fresh = make_engine(model_dir=system_model, block_size=16, prefix_cache=False)
    preamble = len(engine.tokenizer.chat_preamble())
    cached = engine.cache_public_prefix()
    assert cached == preamble > 32 and preamble % 16  # whole blocks and a tail
    assert engine.cache_public_prefix() == cached  # once per engine
    for salt, question in (("tenant:a", "What is 2+2?"), ("tenant:b", "Name a colour.")):
        tokens, hit = run(engine, chat(question), salt)
        assert hit == cached
        assert tokens == run(fresh, chat(question), salt)[0]
    # A chat with its own system prompt starts differently: nothing public to reuse.
    assert run(engine, chat("Hi", system="Be terse."), "tenant:a")[1] == 0
    # A plain-text prompt that happens to spell the preamble out is the same tokens.
    ids = engine.tokenizer.encode_chat(chat("Hi"))
    assert run(engine, ids, "tenant:c")[1] == cached


def test_the_pinned_preamble_outlives_a_workload_that_fills_the_cache(
    make_engine: EngineFactory, system_model: Path
) -> None:
    engine = make_engine(model_dir=system_model, block_size=16, num_kv_blocks=24)
    cached = engine.cache_public_prefix()
    pinned = -(-cached // 16)  # the tail's block too
    assert engine.blocks.num_pinned_blocks == pinned
    assert engine.blocks.num_free_blocks == 24 - pinned
    # Prompts of other tenants that together need every free block, twice over.
    for i in range(6):
        run(engine, [(i * 37 + j) % 250 + 3 for j in range(100)], f"tenant:{i}")
    assert run(engine, chat("Still there?"), "tenant:new")[1] == cached


def test_an_engine_without_a_prefix_cache_caches_nothing(
    make_engine: EngineFactory, system_model: Path
) -> None:
    engine = make_engine(model_dir=system_model, prefix_cache=False)
    assert engine.cache_public_prefix() == 0
    assert run(engine, chat("Hi"), "tenant:a")[1] == 0


def test_a_busy_engine_refuses_to_cache_the_preamble(
    make_engine: EngineFactory, system_model: Path
) -> None:
    engine = make_engine(model_dir=system_model)
    engine.enqueue(engine.make_request(chat("Hi"), GREEDY))
    with pytest.raises(RuntimeError, match="idle"):
        engine.cache_public_prefix()
    while engine.has_unfinished():
        engine.step()


def test_the_engine_service_caches_the_preamble_once_idle(
    make_engine: EngineFactory, system_model: Path
) -> None:
    with EngineService(make_engine(model_dir=system_model)) as service:
        deadline = time.monotonic() + 30
        while service.call(lambda e: e.public_prefix_tokens) is None:
            assert time.monotonic() < deadline, "the idle service never cached the preamble"
            time.sleep(0.01)
        stream = service.submit(chat("What is 2+2?"), GREEDY, cache_salt="tenant:a")
        assert stream.result().usage.cached_tokens == service.engine.public_prefix_tokens > 0


def test_an_idle_worker_process_caches_the_preamble_before_it_packs(
    make_engine: EngineFactory, system_model: Path, tmp_path: Path
) -> None:
    import os

    from ember_functions.engine_config import EngineConfig
    from ember_functions.worker_process import WorkerProcess

    config = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)
    worker = WorkerProcess.spawn(
        worker_id=f"t{os.getpid()}-public",
        model=str(system_model),
        home=tmp_path,
        engine_config=config,
    )
    try:
        assert worker.wait_packed(timeout_s=60)  # it caches the preamble first, then packs
        request = worker.prepare(
            chat("What is 2+2?"), GREEDY, request_id="r1", cache_salt="tenant:a"
        )
        got = worker.submit_prepared(request).result()
        fresh = make_engine(model_dir=system_model, prefix_cache=False)
        cached = len(fresh.tokenizer.chat_preamble())
        assert got.usage.cached_tokens == cached > 0
        assert got.token_ids == run(fresh, chat("What is 2+2?"), "tenant:a")[0]
        # The request's blocks came back; the preamble's stay pinned.
        assert worker.free_kv_blocks == 64 - -(-cached // 16)
    finally:
        worker.close()
