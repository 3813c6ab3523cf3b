"""Text <-> token ids for one model, and chat prompts.

``Tokenizer`` wraps a Hugging Face ``tokenizers.Tokenizer`` plus the settings that live
beside it in a model directory. Streaming decode is ``detokenizer.py``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember_core import InvalidRequestError, ModelFormatError
from ember_functions.chat_template import (
    FALLBACK_TEMPLATE,
    ChatTemplate,
    compile_template,
    load_chat_templates,
    normalize_messages,
    normalize_tools,
    read_json_object,
    render,
)
from ember_functions.decode_backend import TableBackend, has_id
from ember_weights_store.decode_file import DECODE_FILE

if TYPE_CHECKING:
    import tokenizers


def _parse(path: Path) -> tokenizers.Tokenizer:
    # Imported here, not with the module: a worker that decodes from a table and is given
    # prompts as ids parses nothing on its way to READY, and need not load the library
    # either (~5 ms of its imports).
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises bare Exception for any parse failure
        raise ModelFormatError(
            f"{path} could not be loaded ({exc}); replace it with the model's original "
            "tokenizer.json"
        ) from exc


def _token_text(value: Any, key: str, origin: str) -> str | None:
    # Special tokens are saved either as plain strings or as serialized AddedToken objects.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ModelFormatError(
        f"{key} in {origin} must be a string or an object with a 'content' string, "
        f"found {value!r}; fix the entry in that file"
    )


def _token_ids(value: Any, key: str, origin: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        # bool is an int subclass; true/false here is a broken file, not token 0/1.
        if isinstance(item, bool) or not isinstance(item, int):
            raise ModelFormatError(
                f"{key} in {origin} must be a token id or a list of token ids, found {value!r}; "
                "fix the entry in that file"
            )
    return list(items)


class Tokenizer:
    """One model's tokenizer: encode, decode, chat templates and the set of EOS ids.

    Build it with :meth:`from_dir`. ``encode`` never lets the ``tokenizer.json``
    post-processor add tokens; BOS is added by this class alone, and only when the text
    does not already start with it, so a template that writes ``{{ bos_token }}`` itself
    never yields a double BOS. EOS is never appended to a prompt.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | TableBackend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        origin: str = "tokenizer",
        encoder: Callable[[], tokenizers.Tokenizer] | None = None,
    ) -> None:
        # ``encoder``, if given, makes the backend that encodes, on first use: ``backend``
        # then decodes only (a decode-only copy: ember_weights_store.decode_file).
        self._backend = backend
        self._encoder: tokenizers.Tokenizer | None = (
            backend if encoder is None and not isinstance(backend, TableBackend) else None
        )
        self._make_encoder = encoder
        self._encoder_lock = threading.Lock()
        self._origin = origin
        self._special_tokens = dict(special_tokens or {})
        self._bos_token_id = self._lookup("bos_token", required=True)
        eos = set(extra_eos_token_ids)
        eos_from_config = self._lookup("eos_token", required=True)
        if eos_from_config is not None:
            eos.add(eos_from_config)
        # Asked id by id: reading the whole vocabulary out (~30 ms for 49k tokens) would
        # put that on every worker's cold start.
        bad = sorted(i for i in eos if i < 0 or not has_id(backend, i))
        if bad:
            raise ModelFormatError(
                f"eos_token_id {bad} in {origin} is outside the vocabulary (no token has that "
                "id); fix eos_token_id in generation_config.json/config.json"
            )
        if not eos:
            raise ModelFormatError(
                f"{origin} names no end-of-sequence token, so generation could never stop on its "
                "own; set eos_token in tokenizer_config.json or eos_token_id in "
                "generation_config.json"
            )
        self._eos_token_ids = frozenset(eos)
        pad = self._lookup("pad_token", required=False)
        self._pad_token_id = pad if pad is not None else pad_token_id
        named_ids = (self._lookup(key, required=False) for key in self._special_tokens)
        self._special_token_ids = frozenset(
            {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
            | {i for i in named_ids if i is not None}
            | self._eos_token_ids
        )
        if add_bos_token is None:
            add_bos_token = self._post_processor_adds_bos()
        self._add_bos = bool(add_bos_token) and self._bos_token_id is not None
        self._template_sources = dict(chat_templates or {})
        if self._template_sources and "default" not in self._template_sources:
            raise ModelFormatError(
                f"the chat templates of {origin} include no 'default' one; name one 'default'"
            )
        # (named templates, the fallback), compiled once: here, so a broken template fails
        # the load; at the first encode for a decode-first tokenizer (nothing renders before).
        self._compiled: tuple[dict[str, ChatTemplate], ChatTemplate] | None = None
        if encoder is None:
            self._chat_templates()
        self.source_dir: Path | None = None  # set by from_dir: another process can load it too

    @classmethod
    def from_dir(cls, model_dir: Path, *, decode_first: bool = False) -> Tokenizer:
        """Load ``tokenizer.json`` and the settings beside it in a Hugging Face model directory.

        ``tokenizer.json`` is required; ``tokenizer_config.json``, ``generation_config.json``
        and ``config.json`` are read when present. The EOS set is the union of the
        ``eos_token`` in the tokenizer config and every ``eos_token_id`` in the other two.
        With ``decode_first``, where the directory has a decode-only copy
        (``ember_weights_store.decode_file``), that is parsed now and ``tokenizer.json``
        on the first encode: half the parse for a worker, which is given prompts as ids.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelFormatError(
                f"model directory {model_dir} does not exist; convert or download the model first"
            )
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"tokenizer.json is missing from {model_dir}; Ember needs the fast-tokenizer file "
                "(save it with transformers' tokenizer.save_pretrained) next to the weights"
            )
        decode_file = model_dir / DECODE_FILE
        backend: tokenizers.Tokenizer | TableBackend
        encoder: Callable[[], tokenizers.Tokenizer] | None = None
        tabled = (
            TableBackend.from_dir(model_dir, full=functools.partial(_parse, tokenizer_file))
            if decode_first
            else None
        )
        if tabled is not None:
            # Nothing parsed now: the table decodes; the whole file is parsed at the first
            # encode, or whatever else first needs it (one parse, shared).
            backend, encoder = tabled, tabled.full
        elif decode_first and decode_file.is_file():
            backend = _parse(decode_file)
            encoder = functools.partial(_parse, tokenizer_file)
        else:
            backend = _parse(tokenizer_file)
        config = read_json_object(model_dir / "tokenizer_config.json", required=False)
        generation = read_json_object(model_dir / "generation_config.json", required=False)
        model_config = read_json_object(model_dir / "config.json", required=False)
        origin = str(model_dir)

        specials: dict[str, str] = {}
        for key, value in config.items():
            # Every named *_token (bos, eos, pad, unk, and model-specific ones) is a template
            # variable, as in transformers; add_bos_token and friends are booleans, not tokens.
            if key.endswith("_token") and not isinstance(value, bool):
                text = _token_text(value, key, "tokenizer_config.json")
                if text is not None:
                    specials[key] = text
        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ModelFormatError(
                f"add_bos_token in tokenizer_config.json must be true or false, found {add_bos!r}"
            )
        eos_ids: list[int] = []
        pad_ids: list[int] = []
        for data, name in ((generation, "generation_config.json"), (model_config, "config.json")):
            eos_ids += _token_ids(data.get("eos_token_id"), "eos_token_id", name)
            pad_ids += _token_ids(data.get("pad_token_id"), "pad_token_id", name)
        tokenizer = cls(
            backend,
            special_tokens=specials,
            chat_templates=load_chat_templates(model_dir, config),
            add_bos_token=add_bos,
            extra_eos_token_ids=eos_ids,
            pad_token_id=pad_ids[0] if pad_ids else None,
            origin=origin,
            encoder=encoder,
        )
        tokenizer.source_dir = model_dir
        return tokenizer

    def _lookup(self, key: str, *, required: bool) -> int | None:
        text = self._special_tokens.get(key)
        if text is None:
            return None
        token_id = self._backend.token_to_id(text)
        if token_id is None and required:
            raise ModelFormatError(
                f"{key} {text!r} from the tokenizer config of {self._origin} is not in "
                "tokenizer.json's vocabulary; the two files disagree, restore both from the model"
            )
        return int(token_id) if token_id is not None else None

    def _post_processor_adds_bos(self) -> bool:
        # Without an explicit add_bos_token, tokenizer.json's post-processor decides, as in
        # transformers (Llama 3 adds <|begin_of_text|> this way).
        if self._bos_token_id is None:
            return False
        with_specials = self._backend.encode("a", add_special_tokens=True).ids
        without = self._backend.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self._bos_token_id] and without[:1] != [self._bos_token_id]

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (read on
        first use: it reads the whole vocabulary)."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        # Added tokens may sit past the base vocabulary, so count up to the highest id.
        return max(
            self._backend.get_vocab_size(with_added_tokens=True),
            max(vocab.values(), default=-1) + 1,
        )

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Added tokens marked special, the tokenizer config's named tokens and every EOS id."""
        return self._special_token_ids

    @property
    def add_bos_token(self) -> bool:
        """``encode(..., add_special_tokens=True)`` prepends BOS when the text lacks it."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template, or None when the fallback template is used."""
        return self._template_sources.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their single ids."""
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"text to tokenize must be a string, got {type(text).__name__}", param="prompt"
            )
        ids: list[int] = self._encoding_backend().encode(text, add_special_tokens=False).ids
        bos = self._bos_token_id
        if add_special_tokens and self._add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def _chat_templates(self) -> tuple[dict[str, ChatTemplate], ChatTemplate]:
        compiled = self._compiled
        if compiled is None:  # two threads may both compile: either result will do
            origin = self._origin
            compiled = self._compiled = (
                {
                    name: compile_template(source, origin=origin)
                    for name, source in self._template_sources.items()
                },
                compile_template(FALLBACK_TEMPLATE, origin="Ember's fallback template"),
            )
        return compiled

    def _encoding_backend(self) -> tokenizers.Tokenizer:
        encoder = self._encoder
        if encoder is None:
            with self._encoder_lock:  # encodes may come from any thread: parse once
                if self._encoder is None:
                    assert self._make_encoder is not None  # set whenever _encoder is not
                    self._encoder = self._make_encoder()
                encoder = self._encoder
        return encoder

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids outside the vocabulary decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render chat messages to prompt text with the model's template.

        Models without a chat template (base models) use ``FALLBACK_TEMPLATE`` from
        ``ember_functions.chat_template``: ``role: content`` lines then ``assistant:``,
        so they can still be called through the chat API. Invalid messages, tools the
        template cannot use and messages the template rejects raise ``InvalidRequestError``.
        """
        plain = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        templates, fallback = self._chat_templates()
        template = templates.get("default", fallback)
        if tool_list is not None and "tool_use" in templates:
            template = templates["tool_use"]
        if tool_list and not template.uses_tools:
            raise InvalidRequestError(
                "this model's chat template has no place for tools, so the model cannot call "
                "them; remove 'tools' or use a model trained for tool calling",
                param="tools",
            )
        return render(
            template,
            plain,
            add_generation_prompt=add_generation_prompt,
            tools=tool_list,
            special_tokens=self._special_tokens,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Prompt ids for chat messages: the rendered template, BOS added only if missing."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
        return self.encode(text, add_special_tokens=True)

    def chat_preamble(self) -> list[int]:
        """The token ids every chat of one user message starts with, whatever it says:
        the template's own text before the message (a default system prompt, role
        markers). Derived from the template alone, never from a request, so it is public
        and its KV blocks may be shared by every tenant (``BlockManager.public_prefix``).

        Example::

            tok.decode(tok.chat_preamble(), skip_special_tokens=False)
            # '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
        """
        # Messages starting with different kinds of character: a token that merged the
        # template's last characters with the message's first would differ among them.
        probes = ("A", "1", "?", " ")
        try:
            renders = [self.encode_chat([{"role": "user", "content": p}]) for p in probes]
        except InvalidRequestError:  # a template that refuses a lone user message
            return []
        common = 0
        for ids_at in zip(*renders, strict=False):  # position by position, to the shortest
            if len(set(ids_at)) > 1:
                break
            common += 1
        return renders[0][:common]
