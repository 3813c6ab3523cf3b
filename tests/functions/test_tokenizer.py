"""Tokenizer loading, encode/BOS rules, EOS sets and chat templates checked against transformers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from ember_core import InvalidRequestError, ModelFormatError
from ember_functions.tokenizer import Tokenizer

from . import trained_tokenizers

CORPUS = [
    "Hello world, this is a small corpus for testing tokenizers.",
    "Café crème brûlée naïve façade résumé — déjà vu.",
    "日本語のテキストと中文文本 混合 한국어 텍스트",
    "Emoji time 🎉🚀👍🏽 and 👨‍👩‍👧 family, flags 🇫🇷.",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Spaces   and\ttabs\nand newlines\n\n  indented lines",
] * 20

CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def byte_level_bpe() -> tokenizers.Tokenizer:
    return trained_tokenizers.byte_level_bpe(CORPUS, vocab_size=600)


def sentencepiece_bpe() -> tokenizers.Tokenizer:
    return trained_tokenizers.sentencepiece_bpe(CORPUS, limit_alphabet=60)


def write_model(
    path: Path,
    backend: tokenizers.Tokenizer,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, data in (
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
        ("config.json", config),
    ):
        if data is not None:
            (path / name).write_text(json.dumps(data), encoding="utf-8")
    return path


CHATML_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "chat_template": CHATML,
        # The AddedToken-object form that save_pretrained writes.
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "bos_token": None,
    }
    return write_model(tmp_path_factory.mktemp("chatml"), byte_level_bpe(), config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"chat_template": LLAMA2, "add_bos_token": True, **LLAMA_SPECIALS}
    return write_model(tmp_path_factory.mktemp("llama"), sentencepiece_bpe(), config)


def hf_tokenizer(model_dir: Path, specials: dict[str, str], template: str) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), chat_template=template, **specials
    )


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You answer in French. <b>&amp;</b>"},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "Quatre 🎉, évidemment."},
        {"role": "user", "content": "日本語で言って"},
    ],
    [
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Emoji: 👨‍👩‍👧"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("kind", ["chatml", "llama"])
def test_chat_template_matches_transformers(
    kind: str,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    chatml_dir: Path,
    llama_dir: Path,
) -> None:
    model_dir, specials, template = {
        "chatml": (chatml_dir, CHATML_SPECIALS, CHATML),
        "llama": (llama_dir, LLAMA_SPECIALS, LLAMA2),
    }[kind]
    ours = Tokenizer.from_dir(model_dir)
    hf = hf_tokenizer(model_dir, specials, template)
    expected = hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    # Prompt ids as transformers tokenizes a rendered chat (no extra specials) agree too.
    assert ours.encode(rendered) == hf.encode(rendered, add_special_tokens=False)


def test_tools_render_like_transformers_without_html_escaping(chatml_dir: Path) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for <city> & région",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    hf = hf_tokenizer(chatml_dir, CHATML_SPECIALS, CHATML)
    rendered = Tokenizer.from_dir(chatml_dir).apply_chat_template(messages, tools=tools)
    assert rendered == hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert "<city> & région" in rendered


def test_text_parts_are_joined(chatml_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatml_dir)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = tok.apply_chat_template([{"role": "user", "content": parts}])
    assert as_parts == tok.apply_chat_template([{"role": "user", "content": "first\nsecond"}])


def test_llama_bos_is_added_once(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    hf = hf_tokenizer(llama_dir, LLAMA_SPECIALS, LLAMA2)
    bos = tok.bos_token_id
    assert bos == 1 and tok.add_bos_token
    assert tok.encode("Hello world", add_special_tokens=True) == hf.encode("Hello world")
    assert tok.encode("Hello world")[0] != bos
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<s>[INST] Hi [/INST]")
    for ids in (
        tok.encode(prompt, add_special_tokens=True),
        tok.encode_chat([{"role": "user", "content": "Hi"}]),
    ):
        assert ids[0] == bos and ids.count(bos) == 1


def test_bos_from_post_processor_when_config_is_silent(tmp_path: Path) -> None:
    # Llama 3 style: no add_bos_token key, tokenizer.json's post-processor adds BOS.
    tok = Tokenizer.from_dir(write_model(tmp_path, sentencepiece_bpe(), dict(LLAMA_SPECIALS)))
    assert tok.add_bos_token
    assert tok.encode("x", add_special_tokens=True)[0] == 1
    off = write_model(
        tmp_path / "off", sentencepiece_bpe(), {**LLAMA_SPECIALS, "add_bos_token": False}
    )
    assert Tokenizer.from_dir(off).encode("x", add_special_tokens=True)[0] != 1


def test_ids_and_sets(chatml_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatml_dir)
    backend = tokenizers.Tokenizer.from_file(str(chatml_dir / "tokenizer.json"))
    assert tok.vocab_size == backend.get_vocab_size()
    assert tok.bos_token_id is None and not tok.add_bos_token
    assert tok.eos_token_ids == frozenset({tok.token_to_id("<|im_end|>")})
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.special_token_ids == frozenset({0, 1, 2})
    text = "Hi <|im_start|>there 🎉<|im_end|>"
    ids = tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "Hi there 🎉"


def test_eos_set_is_union_of_three_files(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(
        write_model(
            tmp_path,
            byte_level_bpe(),
            {"eos_token": "<|im_end|>"},
            generation_config={"eos_token_id": [0, 7], "pad_token_id": 5},
            config={"eos_token_id": 9, "bos_token_id": 1},
        )
    )
    assert tok.eos_token_ids == frozenset({2, 0, 7, 9})
    assert tok.pad_token_id == 5
    assert {0, 2, 7, 9} <= tok.special_token_ids


def test_fallback_template_for_base_models(tmp_path: Path) -> None:
    model_dir = write_model(
        tmp_path, sentencepiece_bpe(), {**LLAMA_SPECIALS, "add_bos_token": True}
    )
    tok = Tokenizer.from_dir(model_dir)
    assert tok.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("user: Hi\n")
    assert tok.encode_chat(messages)[0] == tok.bos_token_id
    with pytest.raises(InvalidRequestError, match="no place for tools"):
        tok.apply_chat_template(messages, tools=[{"type": "function"}])


def test_named_templates_and_template_file(tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    model_dir = write_model(
        tmp_path, byte_level_bpe(), {**CHATML_SPECIALS, "chat_template": templates}
    )
    tok = Tokenizer.from_dir(model_dir)
    msg = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msg) == "Dx"
    assert tok.apply_chat_template(msg, tools=[{"a": 1}, {"b": 2}]) == "T2"
    (model_dir / "chat_template.jinja").write_text("J{{ strftime_now('%Y') }}", encoding="utf-8")
    assert Tokenizer.from_dir(model_dir).apply_chat_template(msg) == f"J{datetime.now().year}"


BAD_MESSAGES: list[tuple[Any, str]] = [
    ("hello", "must be a list"),
    ([], "messages is empty"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\].role"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\].content\[0\]"),
    ([{"role": "user", "content": "a", "extra": {1, 2}}], r"messages\[0\].extra holds a set"),
]


@pytest.mark.parametrize(("messages", "match"), BAD_MESSAGES)
def test_bad_messages_name_index_and_problem(messages: Any, match: str, chatml_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        Tokenizer.from_dir(chatml_dir).apply_chat_template(messages)
    assert info.value.param == "messages"


def test_template_exceptions_become_invalid_request(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        tok.apply_chat_template(messages)


def test_tool_call_turn_may_have_null_content(tmp_path: Path) -> None:
    # OpenAI allows an assistant turn that only calls tools to carry null content.
    template = "{% for m in messages %}{{ m.content or m.tool_calls[0].id }};{% endfor %}"
    config = {**CHATML_SPECIALS, "chat_template": template}
    tok = Tokenizer.from_dir(write_model(tmp_path, byte_level_bpe(), config))
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, call]) == "a;c1;"
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].content must be"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_reasoning_field_is_aliased_like_transformers(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}"
    config = {**CHATML_SPECIALS, "chat_template": template}
    tok = Tokenizer.from_dir(write_model(tmp_path, byte_level_bpe(), config))
    messages = [{"role": "assistant", "content": "a", "reasoning": "because"}]
    assert tok.apply_chat_template(messages) == "because|because;"


def test_sandbox_blocks_underscore_namespace(tmp_path: Path) -> None:
    config = {**CHATML_SPECIALS, "chat_template": "{% set ns = namespace(_x=1) %}x"}
    tok = Tokenizer.from_dir(write_model(tmp_path, byte_level_bpe(), config))
    with pytest.raises(InvalidRequestError, match="underscore"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def _broken(tmp_path: Path, name: str, content: str) -> Path:
    model_dir = write_model(tmp_path, byte_level_bpe(), {"eos_token": "<|im_end|>"})
    (model_dir / name).write_text(content, encoding="utf-8")
    return model_dir


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", "{not json", "tokenizer.json could not be loaded"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json must hold a JSON object"),
        ("generation_config.json", "{oops", "generation_config.json is not readable JSON"),
        ("config.json", '{"eos_token_id": "2"}', "eos_token_id in config.json"),
        ("config.json", '{"eos_token_id": true}', "eos_token_id in config.json"),
        ("config.json", '{"eos_token_id": 100000}', "outside the vocabulary"),
        ("tokenizer_config.json", '{"eos_token": "<nope>"}', "'<nope>' .* not in"),
        ("tokenizer_config.json", '{"eos_token": 5}', "eos_token in tokenizer_config.json"),
        ("tokenizer_config.json", "{}", "names no end-of-sequence token"),
        (
            "tokenizer_config.json",
            '{"eos_token": "<|im_end|>", "chat_template": "{% if %}"}',
            "not valid Jinja",
        ),
        (
            "tokenizer_config.json",
            '{"eos_token": "<|im_end|>", "chat_template": [{"name": "x", "template": "y"}]}',
            "none is 'default'",
        ),
    ],
)
def test_broken_model_files_raise_model_format_error(
    tmp_path: Path, name: str, content: str, match: str
) -> None:
    with pytest.raises(ModelFormatError, match=match):
        Tokenizer.from_dir(_broken(tmp_path, name, content))


def test_missing_files_raise_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.slow
def test_smollm2_template_matches_auto_tokenizer(smollm2_dir: Path) -> None:
    model_dir = smollm2_dir
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    tok = Tokenizer.from_dir(model_dir)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = tok.apply_chat_template(messages)
        assert rendered == expected
        assert tok.encode(rendered) == hf.encode(rendered, add_special_tokens=False)
    assert hf.eos_token_id in tok.eos_token_ids
