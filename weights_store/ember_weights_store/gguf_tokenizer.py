"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF's byte-level BPE metadata.

llama.cpp stores the vocabulary, merges and token types, and names the pre-tokenizer by a
short tag (``tokenizer.ggml.pre``). The tag is mapped back to the splitting rules it stands for:

- ``smollm``: ``Digits(individual_digits=True)`` then GPT-2's byte-level regex.
- ``gpt2``: GPT-2's byte-level regex alone (``ByteLevel(use_regex=True)``), nothing else.

Other tags name other regexes; they are refused rather than approximated, because a
tokenizer that splits differently from the one a model was trained with degrades it silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ember_core import ModelFormatError

__all__ = ["build_tokenizer"]

log = logging.getLogger(__name__)

_SUPPORTED_PRE = ("smollm", "gpt2")
# (HF name, GGUF tokenizer.ggml.* name) of the special token ids carried over.
_SPECIAL_IDS = (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("unk_token_id", "unknown_token_id"),
    ("pad_token_id", "padding_token_id"),
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer splits every digit before the GPT-2 regex runs.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    # "gpt2": the plain GPT-2 regex inside ByteLevel is the whole pre-tokenizer.
    return byte_level


def build_tokenizer(
    get: Callable[[str], Any], *, context_length: int, vocab_size: int
) -> tuple[Tokenizer, dict[str, Any], dict[str, int | None]]:
    """The tokenizer, ``tokenizer_config.json`` and special token ids of a GGUF.

    ``get(key)`` returns a GGUF metadata value or None; ``vocab_size`` is the number of
    embedding rows the token ids must fit.
    """
    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ModelFormatError(
            f"tokenizer model {kind!r} is not supported yet; Ember imports byte-level BPE "
            "('gpt2') tokenizers only. SentencePiece ('llama') GGUFs need an HF tokenizer.json."
        )
    if pre is None:
        log.warning("GGUF names no pre-tokenizer; assuming plain GPT-2 byte-level splitting")
        pre = "gpt2"
    if pre not in _SUPPORTED_PRE:
        raise ModelFormatError(
            f"pre-tokenizer {pre!r} is not supported yet (supported: {', '.join(_SUPPORTED_PRE)})"
        )
    tokens: list[str] = _require(get, "tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens) or not 0 < len(tokens) <= vocab_size:
        raise ModelFormatError(
            f"tokenizer has {len(tokens)} tokens and {len(types)} token types for an embedding "
            f"of {vocab_size} rows; the file is inconsistent"
        )
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)  # a duplicate keeps its first id, as llama.cpp's lookup does
    merges = [tuple(line.split(" ", 1)) for line in _require(get, "tokenizer.ggml.merges")]
    if any(len(pair) != 2 for pair in merges):
        raise ModelFormatError("tokenizer.ggml.merges holds a line that is not 'left right'")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp's CONTROL tokens are HF's special tokens; USER_DEFINED are HF's plain added
    # tokens (never split, but kept when decoding with skip_special_tokens).
    pairs = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, y in pairs if y == 3]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, y in pairs if y == 4]
    )

    ids: dict[str, int | None] = {}
    for key, gguf_key in _SPECIAL_IDS:
        value = get(f"tokenizer.ggml.{gguf_key}")
        if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
            raise ModelFormatError(f"tokenizer.ggml.{gguf_key} = {value!r} is not a token id")
        ids[key] = value
    add_bos = bool(get("tokenizer.ggml.add_bos_token"))
    add_eos = bool(get("tokenizer.ggml.add_eos_token"))
    bos = ids["bos_token_id"] if add_bos else None
    eos = ids["eos_token_id"] if add_eos else None
    tokenizer.post_processor = _post_processor(
        None if bos is None else tokens[bos], bos, None if eos is None else tokens[eos], eos
    )
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, _ in _SPECIAL_IDS:
        value = ids[key]
        tok_config[key.removesuffix("_id")] = None if value is None else tokens[value]
    tok_config |= {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": get("tokenizer.chat_template"),
    }
    return tokenizer, tok_config, ids


def _post_processor(
    bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos_id is None and eos_id is None:
        return byte_level
    # BOS/EOS insertion must live in tokenizer.json: PreTrainedTokenizerFast ignores
    # add_bos_token in tokenizer_config.json.
    head, tail = (f"{bos} " if bos else ""), (f" {eos}" if eos else "")
    specials = [
        (t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None and i is not None
    ]
    template = processors.TemplateProcessing(
        single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B:1{tail}", special_tokens=specials
    )
    return processors.Sequence([byte_level, template])


def _require(get: Callable[[str], Any], key: str) -> Any:
    value = get(key)
    if value is None:
        raise ModelFormatError(f"GGUF lacks {key}; re-convert the model with a recent llama.cpp")
    return value
