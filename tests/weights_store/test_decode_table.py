"""A byte-level tokenizer's decode table decodes exactly as ``tokenizers`` does (every id,
and windows that split characters), is not built for other decoders, and is written into
tokenizer directories, old ones included."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers

from ember_weights_store import LocalBucketTier, WeightsStore
from ember_weights_store.decode_file import DECODE_FILE, decode_only
from ember_weights_store.decode_table import DECODE_TABLE_FILE, DecodeTable, build_decode_table
from ember_weights_store.tokenizer_files import tokenizer_dir

TEXT = (
    "Hello world, café crème — 日本語のテキスト 한국어 🎉🚀👍🏽 👨\u200d👩\u200d👧 🇫🇷\n"
    "\tdef f(x): return x**2  "
)


def _table(tokenizer_json: bytes) -> DecodeTable:
    built = build_decode_table(decode_only(tokenizer_json) or tokenizer_json)
    assert built is not None
    return DecodeTable.from_bytes(built)


def _assert_decodes_as(table: DecodeTable, full: tokenizers.Tokenizer, seed: int) -> None:
    count = full.get_vocab_size(with_added_tokens=True)
    for token_id in range(count + 3):  # and a few ids no token has
        for skip in (True, False):
            assert table.decode([token_id], skip_special_tokens=skip) == full.decode(
                [token_id], skip_special_tokens=skip
            ), (token_id, skip)
    ids = full.encode(TEXT * 2).ids
    rng = random.Random(seed)
    for _ in range(2000):  # windows that start and end mid-character, specials mixed in
        start = rng.randrange(len(ids))
        window = ids[start : start + rng.randrange(1, 12)]
        window += [rng.randrange(count) for _ in range(rng.randrange(3))]
        for skip in (True, False):
            assert table.decode(window, skip_special_tokens=skip) == full.decode(
                window, skip_special_tokens=skip
            ), (window, skip)


def test_smollm2s_table_decodes_every_id_and_window_as_tokenizers(smollm2_dir: Path) -> None:
    raw = (smollm2_dir / "tokenizer.json").read_bytes()
    table = _table(raw)
    full = tokenizers.Tokenizer.from_str(raw.decode())
    assert table.count == 49152 and table.special_ids
    _assert_decodes_as(table, full, seed=0)
    assert table.added["<|im_end|>"] == full.token_to_id("<|im_end|>")


def test_a_byte_level_bpe_with_added_tokens_decodes_as_tokenizers() -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    # An added token that is not special, with characters outside the byte alphabet.
    tok.add_tokens(["naïve→"])
    table = _table(tok.to_str().encode())
    _assert_decodes_as(table, tok, seed=1)
    assert table.special_ids == {tok.token_to_id("<|end|>")}


def test_no_table_for_other_decoders_or_files() -> None:
    metaspace = tokenizers.Tokenizer(tokenizers.models.BPE({"▁a": 0, "a": 1}, []))
    metaspace.decoder = tokenizers.decoders.Metaspace()
    no_decoder = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0}, []))
    for backend in (metaspace, no_decoder):
        assert build_decode_table(backend.to_str().encode()) is None
    assert build_decode_table(b"not json") is None
    assert build_decode_table(json.dumps({"model": {"type": "Unigram"}}).encode()) is None
    byte_level = {"type": "ByteLevel"}
    for vocab in ({"a": "zero"}, {"a": -1}, {"a": 0, "b": 10**9}):  # not what tokenizers writes
        data = {"model": {"type": "BPE", "vocab": vocab}, "decoder": byte_level}
        assert build_decode_table(json.dumps(data).encode()) is None


def test_a_damaged_table_is_refused() -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1}, []))
    tok.decoder = tokenizers.decoders.ByteLevel()
    built = build_decode_table(tok.to_str().encode())
    assert built is not None and DecodeTable.from_bytes(built).decode([0, 1]) == "ab"
    for damaged in (b"junk" + built, built[:-1]):
        with pytest.raises(ValueError):
            DecodeTable.from_bytes(damaged)


def test_tokenizer_dirs_get_the_table_old_ones_too(smollm2_dir: Path, tmp_path: Path) -> None:
    store = WeightsStore([LocalBucketTier(tmp_path / "bucket")])
    store.import_hf_dir(smollm2_dir, model_id="smol")
    manifest = store.manifest("smol")
    assert DECODE_FILE in manifest.tokenizer_files
    written = tokenizer_dir(store, manifest, tmp_path / "tokenizers")
    table = DecodeTable.from_bytes((written / DECODE_TABLE_FILE).read_bytes())
    assert table.decode([9690, 198]) == "system\n"
    (written / DECODE_TABLE_FILE).unlink()  # a directory written before there were tables
    assert tokenizer_dir(store, manifest, tmp_path / "tokenizers") == written
    assert (written / DECODE_TABLE_FILE).is_file()
