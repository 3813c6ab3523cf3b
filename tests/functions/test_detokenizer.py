"""Streaming detokenization: deltas join to exactly what a full decode gives."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest
import tokenizers

from ember_functions.detokenizer import IncrementalDetokenizer
from ember_functions.tokenizer import Tokenizer

from . import trained_tokenizers

CORPUS = [
    "Hello world, this is a small corpus for testing streaming detokenization.",
    "Café crème brûlée naïve façade résumé — déjà vu.",
    "日本語のテキストと中文文本 混合 한국어 텍스트",
    "Emoji time 🎉🚀👍🏽 and 👨‍👩‍👧 family, flags 🇫🇷.",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Spaces   and\ttabs\nand newlines\n\n  indented lines",
] * 20
# Pieces for random texts, including characters the tokenizers never saw in training.
PIECES = [*" ".join(CORPUS[:6]).split(" "), "🦀", "ß", "Ωmega", "𝔘𝔫𝔦", "  ", "\n", "x̧"]


def byte_level_bpe() -> tokenizers.Tokenizer:
    return trained_tokenizers.byte_level_bpe(CORPUS, vocab_size=500)


def sentencepiece_bpe() -> tokenizers.Tokenizer:
    # 32: the characters CORPUS holds 40 times or more; the rest (20 each) fall back to
    # bytes.
    return trained_tokenizers.sentencepiece_bpe(CORPUS, limit_alphabet=32)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    model_dir = tmp_path_factory.mktemp(request.param)
    config: dict[str, Any]
    if request.param == "byte_level":
        byte_level_bpe().save(str(model_dir / "tokenizer.json"))
        config = {"eos_token": "<|im_end|>"}
    else:
        sentencepiece_bpe().save(str(model_dir / "tokenizer.json"))
        config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return Tokenizer.from_dir(model_dir)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_join_to_full_decode_for_text(tok: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        ids = tok.encode(random_text(rng))
        if rng.random() < 0.3:
            # An EOS or other special token in the middle of the output. Shown as text, it
            # splits a byte run, so there it goes between characters (see the random-id test).
            positions = [
                k
                for k in range(len(ids) + 1)
                if skip_special_tokens or not tok.decode(ids[:k]).endswith("\ufffd")
            ]
            ids.insert(rng.choice(positions), rng.choice(sorted(tok.special_token_ids)))
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, ids)
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == full
        # Characters split across tokens are held back, never shown half-decoded (unless a
        # special token landed inside one, which leaves garbage in the full decode too).
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_join_to_full_decode_for_random_ids(
    tok: Tokenizer, skip_special_tokens: bool
) -> None:
    # Random ids include lone UTF-8 lead and continuation bytes (byte-level BPE): garbage a
    # real model can emit. A byte-fallback decoder turns a whole byte run into U+FFFD once any
    # byte in it is invalid, so a later token can change text a full decode shows earlier; no
    # stream can match that, so for SentencePiece only ASCII byte tokens are drawn here.
    rng = random.Random(99)
    pool = [
        i
        for i in range(tok.vocab_size)
        if not re.fullmatch(r"<0x[89A-F].>", tok.id_to_token(i) or "")
    ]
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
        assert "".join(stream(detok, ids)) == tok.decode(
            ids, skip_special_tokens=skip_special_tokens
        )


def test_with_prompt_context_output_continues_prompt_text(tok: Tokenizer) -> None:
    rng = random.Random(7)
    for _ in range(200):
        prompt = tok.encode(random_text(rng), add_special_tokens=True)
        output = tok.encode(" " + random_text(rng))
        prompt_text = tok.decode(prompt)
        full_text = tok.decode(prompt + output)
        assert full_text.startswith(prompt_text)
        detok = IncrementalDetokenizer(tok, prompt)
        assert "".join(stream(detok, output)) == full_text[len(prompt_text) :]


def test_sentencepiece_leading_space_follows_context() -> None:
    backend = sentencepiece_bpe()
    tok = Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    ids = tok.encode("Hello world")
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "Hello world"
    # After a prompt, the first word keeps its space: the text continues the prompt.
    prompt = tok.encode("The quick", add_special_tokens=True)
    first = tok.encode("Hello")
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), first)) == " Hello"


def test_prompt_context_cut_inside_a_character(tok: Tokenizer) -> None:
    # The last prompt tokens start inside a 4-byte character; the output continues the run
    # of byte tokens. Decoding from mid-character would turn the output into U+FFFD.
    ids = tok.encode("x 𝔘𝔫𝔦🦀 ok")
    context = IncrementalDetokenizer.CONTEXT_TOKENS
    splits = [
        k
        for k in range(context, len(ids))
        if not tok.decode(ids[:k]).endswith("\ufffd")
        and tok.decode(ids[k - context : k]).startswith("\ufffd")
    ]
    assert splits
    for k in splits:
        expected = tok.decode(ids)[len(tok.decode(ids[:k])) :]
        assert "".join(stream(IncrementalDetokenizer(tok, ids[:k]), ids[k:])) == expected


def test_multibyte_character_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("a🦀")
    assert len(ids) >= 3  # the crab is not in either vocabulary: it spans byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "🦀"
    # A character cut off by the end of generation is released by flush as decode shows it.
    detok = IncrementalDetokenizer(tok)
    partial = ids[:-1]
    assert "".join(detok.push(i) for i in partial) == "a"
    assert detok.flush() == tok.decode(partial)[1:]
    assert detok.flush() == ""


def test_cost_per_token_is_bounded(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[int] = []
    decode = tok.decode

    def spy(ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        widths.append(len(ids))
        return decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    rng = random.Random(5)
    ids = tok.encode(" ".join(random_text(rng) for _ in range(300)))
    ids += [rng.choice(sorted(tok.special_token_ids))] * 100  # a long invisible run
    ids += [tok.encode("🦀")[0]] * 100  # a long run of garbage bytes
    detok = IncrementalDetokenizer(tok, ids[:50])
    text = "".join(stream(detok, ids[50:]))
    assert len(ids) > 1000
    assert max(widths) <= 2 * IncrementalDetokenizer.MAX_PENDING_TOKENS
    # Two short decodes per token at most, never a re-decode of the whole output.
    assert len(widths) <= 2 * len(ids) + 2
    assert text == tok.decode(ids)[len(tok.decode(ids[:50])) :]
