"""A worker's tokenizer parses the decode-only copy (no BPE merges) to serve and the whole
``tokenizer.json`` at its first encode: decodes and encodes stay what they were."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers

from ember_core import ModelFormatError
from ember_functions.decode_backend import TableBackend
from ember_functions.host_model import HostModel
from ember_functions.tokenizer import Tokenizer
from ember_weights_store import LocalBucketTier, WeightsStore
from ember_weights_store.decode_file import DECODE_FILE, decode_only
from ember_weights_store.decode_table import DECODE_TABLE_FILE, build_decode_table

from .test_tokenizer import (
    CHATML,
    CORPUS,
    LLAMA2,
    LLAMA_SPECIALS,
    byte_level_bpe,
    sentencepiece_bpe,
    write_model,
)


def with_decode_file(model_dir: Path) -> Path:
    decoder = decode_only((model_dir / "tokenizer.json").read_bytes())
    assert decoder is not None
    (model_dir / DECODE_FILE).write_bytes(decoder)
    return model_dir


def with_decode_table(model_dir: Path) -> Path:
    table = build_decode_table((model_dir / DECODE_FILE).read_bytes())
    assert table is not None
    (model_dir / DECODE_TABLE_FILE).write_bytes(table)
    return model_dir


@pytest.fixture(params=["byte-level", "byte-level, decode table", "sentencepiece"])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param.startswith("byte-level"):
        config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
        model = with_decode_file(write_model(tmp_path / "chatml", byte_level_bpe(), config))
        return with_decode_table(model) if "table" in request.param else model
    config = {"chat_template": LLAMA2, "add_bos_token": True, **LLAMA_SPECIALS}
    return with_decode_file(write_model(tmp_path / "llama", sentencepiece_bpe(), config))


def test_the_decode_only_copy_drops_the_merges_and_nothing_else(model_dir: Path) -> None:
    full = json.loads((model_dir / "tokenizer.json").read_text())
    copy = json.loads((model_dir / DECODE_FILE).read_text())
    assert full["model"]["merges"] and copy["model"]["merges"] == []
    copy["model"]["merges"] = full["model"]["merges"]
    assert copy == full


def test_nothing_to_drop_gives_no_copy() -> None:
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, "<unk>"))
    no_merges = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0}, []))
    for backend in (wordlevel, no_merges):
        assert decode_only(backend.to_str().encode()) is None
    assert decode_only(b"not json") is None


def test_decode_first_decodes_and_encodes_as_the_whole_file(model_dir: Path) -> None:
    full = Tokenizer.from_dir(model_dir)
    lazy = Tokenizer.from_dir(model_dir, decode_first=True)
    assert lazy._encoder is None  # the merges are not parsed yet
    vocab = full.vocab_size
    assert lazy.vocab_size == vocab
    assert lazy.eos_token_ids == full.eos_token_ids
    assert lazy.special_token_ids == full.special_token_ids
    assert lazy.add_bos_token == full.add_bos_token
    for token_id in range(vocab):
        assert lazy.decode([token_id], skip_special_tokens=False) == full.decode(
            [token_id], skip_special_tokens=False
        )
    for text in CORPUS[:6]:
        ids = full.encode(text)
        assert lazy.decode(ids) == full.decode(ids)
        assert lazy.encode(text, add_special_tokens=True) == full.encode(
            text, add_special_tokens=True
        )
    assert lazy._encoder is not None  # parsed at the first encode


def test_with_a_decode_table_nothing_is_parsed_until_the_first_encode(tmp_path: Path) -> None:
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "add_bos_token": False}
    model = write_model(tmp_path / "chatml", byte_level_bpe(), config)
    model = with_decode_table(with_decode_file(model))
    full = Tokenizer.from_dir(model)
    lazy = Tokenizer.from_dir(model, decode_first=True)
    backend = lazy._backend
    assert isinstance(backend, TableBackend)
    # What a worker needs on its way to its first token: its specials and decoding.
    assert lazy.eos_token_ids == full.eos_token_ids
    assert lazy.special_token_ids == full.special_token_ids
    ids = full.encode(CORPUS[3]) + sorted(full.special_token_ids)
    for skip in (True, False):
        assert lazy.decode(ids, skip_special_tokens=skip) == full.decode(
            ids, skip_special_tokens=skip
        )
    copy.copy(backend)  # probing for dunder methods parses nothing either
    assert backend.full._made is None  # no tokenizer.json parsed, not even decode-only
    assert lazy.encode(CORPUS[0], add_special_tokens=True) == full.encode(
        CORPUS[0], add_special_tokens=True
    )
    assert lazy._encoder is backend.full._made is not None  # one parse, shared
    assert lazy.vocab_size == full.vocab_size


def test_the_whole_file_is_parsed_once_whatever_the_threads(model_dir: Path) -> None:
    lazy = Tokenizer.from_dir(model_dir, decode_first=True)
    parses = []
    make = lazy._make_encoder
    assert make is not None

    def counting() -> tokenizers.Tokenizer:
        parses.append(1)
        return make()

    lazy._make_encoder = counting
    barrier = threading.Barrier(8)

    def encode() -> None:
        barrier.wait()
        lazy.encode("Hello world")

    threads = [threading.Thread(target=encode) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert parses == [1]


def test_without_a_copy_decode_first_parses_the_whole_file(tmp_path: Path) -> None:
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    plain = write_model(tmp_path / "plain", byte_level_bpe(), config)
    lazy = Tokenizer.from_dir(plain, decode_first=True)
    assert lazy._encoder is not None
    assert lazy.encode("Hello") == Tokenizer.from_dir(plain).encode("Hello")


def test_import_stores_the_copy_and_a_worker_load_parses_it(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    write_model(model, byte_level_bpe(), config)  # a tokenizer with merges
    store = WeightsStore([LocalBucketTier(tmp_path / "bucket")])
    store.import_hf_dir(model, model_id="acme/tiny")
    assert DECODE_FILE in store.manifest("acme/tiny").tokenizer_files
    host = HostModel.from_store(
        store, "acme/tiny", tokenizer_cache=tmp_path / "tokenizers", decode_first=True
    )
    tok = host.tokenizer
    assert tok.source_dir is not None and (tok.source_dir / DECODE_FILE).is_file()
    assert tok._encoder is None
    assert tok.encode("Hello world") == Tokenizer.from_dir(model).encode("Hello world")


def test_chat_templates_compile_at_the_first_render_not_at_a_decode_first_load(
    tmp_path: Path,
) -> None:
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    model = with_decode_file(write_model(tmp_path / "chatml", byte_level_bpe(), config))
    lazy = Tokenizer.from_dir(model, decode_first=True)
    assert lazy._compiled is None and lazy.chat_template == CHATML
    chat = [{"role": "user", "content": "Hi"}]
    assert lazy.encode_chat(chat) == Tokenizer.from_dir(model).encode_chat(chat)
    assert lazy._compiled is not None
    # A broken template still fails a full load at once, and a decode-first one at its
    # first render, with the same message.
    broken = {"chat_template": "{% if %}", "eos_token": "<|im_end|>"}
    bad = with_decode_file(write_model(tmp_path / "bad", byte_level_bpe(), broken))
    with pytest.raises(ModelFormatError, match="not valid Jinja"):
        Tokenizer.from_dir(bad)
    deferred = Tokenizer.from_dir(bad, decode_first=True)
    assert deferred.decode(deferred.encode("Hi")) == "Hi"
    with pytest.raises(ModelFormatError, match="not valid Jinja"):
        deferred.encode_chat(chat)


def test_a_decode_table_tokenizer_loads_the_tokenizers_library_at_the_first_encode(
    tmp_path: Path,
) -> None:
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "add_bos_token": False}
    model = write_model(tmp_path / "chatml", byte_level_bpe(), config)
    model = with_decode_table(with_decode_file(model))
    code = (
        "import sys; from pathlib import Path; from ember_functions.tokenizer import Tokenizer\n"
        f"t = Tokenizer.from_dir(Path({str(model)!r}), decode_first=True)\n"
        "t.decode([1, 2, 3]); loaded = 'tokenizers' in sys.modules\n"
        "t.encode('hello'); print(loaded, 'tokenizers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
