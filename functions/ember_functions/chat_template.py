"""Chat messages -> prompt text, rendered the way ``transformers`` renders chat templates.

A model's chat template is Jinja code downloaded with its weights, so it is untrusted: it
runs in jinja2's immutable sandbox with the same globals and filters ``transformers``
gives it (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps HTML characters,
``namespace`` without underscore attributes, the ``loopcontrols`` extension). Matching
``transformers`` exactly matters: a prompt that differs by one newline from what the
model was trained on degrades its answers without any error.

jinja2 is imported at the first compile, not with this module: a worker decodes only until
it first encodes (``Tokenizer.from_dir(decode_first=True)``), and its cold start need not
pay for the import (~12 ms here).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ember_core import InvalidRequestError, ModelFormatError

if TYPE_CHECKING:
    import jinja2

ROLES = frozenset({"system", "user", "assistant", "tool"})
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

#: Used for models that ship no chat template (base models). One ``role: content`` line
#: per message, then ``assistant:`` to cue the reply. It carries no special tokens, so a
#: base model sees plain text it can continue; ``Tokenizer.encode_chat`` still adds BOS
#: when the tokenizer is configured to.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] or '' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def read_json_object(path: Path, *, required: bool) -> dict[str, Any]:
    """A JSON object from a model file; {} when an optional file is absent."""
    if not path.is_file():
        if required:
            raise ModelFormatError(
                f"{path.name} is missing from {path.parent}; copy it from the model's original "
                "files (it is part of every Hugging Face model) and load again"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(
            f"{path} is not readable JSON ({exc}); replace it with the model's original file"
        ) from exc
    if not isinstance(data, dict):
        raise ModelFormatError(
            f"{path} must hold a JSON object, found {type(data).__name__}; "
            "replace it with the model's original file"
        )
    return data


def load_chat_templates(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The model's chat templates by name ("default", maybe "tool_use"); {} if none."""
    # Same precedence as transformers: a standalone template file beats the config entry.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return {"default": jinja_file.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelFormatError(
                f"{jinja_file} is not readable UTF-8 text ({exc}); replace it"
            ) from exc
    origin = "chat_template.json"
    raw = read_json_object(model_dir / origin, required=False).get("chat_template")
    if raw is None:
        origin = "tokenizer_config.json"
        raw = tokenizer_config.get("chat_template")
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        named: dict[str, str] = {}
        for entry in raw:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ModelFormatError(
                    f"chat_template in {origin} lists {entry!r}; each entry must be "
                    "{'name': <string>, 'template': <string>}"
                )
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ModelFormatError(
                f"chat_template in {origin} names templates {sorted(named)} but none is "
                "'default'; rename the one to use for plain chat to 'default'"
            )
        return named
    raise ModelFormatError(
        f"chat_template in {origin} must be a string or a list of {{name, template}} objects, "
        f"found {type(raw).__name__}"
    )


def _raise_exception(message: str) -> NoReturn:
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; prompts must see the raw characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates, without the class attributes a template could climb through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    import jinja2.exceptions

    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set underscore attributes on a namespace, got {name!r}"
        )


@functools.cache
def _template_namespace() -> type:
    """Jinja's ``namespace`` that refuses underscore attributes (a way into CPython
    internals). A subclass of jinja2's, so made once jinja2 is imported."""
    import jinja2.utils

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            # No named ``self``, as in jinja2, so that ``namespace(self=...)`` still works.
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_namespace_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_namespace_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and what it reads."""

    source: str
    template: jinja2.Template
    #: The template reads the ``tools`` variable, so tool schemas passed to it take effect.
    uses_tools: bool


def compile_template(source: str, *, origin: str) -> ChatTemplate:
    """Compile a chat template in a fresh sandbox; a syntax error is the model's fault."""
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.meta
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _template_namespace()
    try:
        template = env.from_string(source)
        uses_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ModelFormatError(
            f"the chat template in {origin} is not valid Jinja (line {exc.lineno}: {exc.message}); "
            "fix or remove the template in that file"
        ) from exc
    return ChatTemplate(source=source, template=template, uses_tools=uses_tools)


def _plain(value: Any, where: str) -> Any:
    # Templates only ever see JSON-shaped data: no caller object with methods reaches the
    # sandbox, and the template cannot mutate the caller's messages.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequestError(
                    f"{where} has a non-string key {key!r}; use string keys only", param="messages"
                )
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise InvalidRequestError(
        f"{where} holds a {type(value).__name__}; only JSON values (strings, numbers, booleans, "
        "null, lists, objects) can be passed to a chat template",
        param="messages",
    )


def _join_content(content: Any, index: int, message: Mapping[str, Any]) -> str | None:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        # OpenAI allows an assistant turn that only calls tools to have null content.
        return None
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(
                    f"{where}[{j}] must be an object {{'type': 'text', 'text': <string>}}; "
                    "this model accepts text content parts only",
                    param="messages",
                )
            texts.append(part["text"])
        # Separate parts by a newline so words from adjacent parts never run together.
        return "\n".join(texts)
    raise InvalidRequestError(
        f"{where} must be a string or a list of text parts, got {type(content).__name__}",
        param="messages",
    )


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages and return plain copies with text content joined to a string.

    Raises ``InvalidRequestError`` naming the first bad message and what is wrong with it.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidRequestError(
            f"messages must be a list of message objects, got {type(messages).__name__}",
            param="messages",
        )
    if not messages:
        raise InvalidRequestError(
            "messages is empty; send at least one message such as "
            "{'role': 'user', 'content': 'Hello'}",
            param="messages",
        )
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content', "
                f"got {type(message).__name__}",
                param="messages",
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {role!r}; use one of {', '.join(sorted(ROLES))}",
                param="messages",
            )
        if "content" not in message:
            raise InvalidRequestError(
                f"messages[{i}] has no 'content'; add the message text as 'content'",
                param="messages",
            )
        plain = _plain(message, f"messages[{i}]")
        plain["content"] = _join_content(message["content"], i, message)
        # As transformers does: templates read reasoning as reasoning_content (gpt-oss: thinking).
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Validate a list of tool schemas (JSON objects) for the template's ``tools`` variable."""
    if tools is None:
        return None
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise InvalidRequestError(
            f"tools must be a list of tool objects, got {type(tools).__name__}", param="tools"
        )
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(
                f"tools[{i}] must be an object (a JSON schema), got {type(tool).__name__}",
                param="tools",
            )
        out.append(_plain(tool, f"tools[{i}]"))
    return out


def render(
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    special_tokens: Mapping[str, str],
) -> str:
    """Render already-normalized messages; a template that refuses them is the caller's error."""
    import jinja2.exceptions

    try:
        return template.template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as exc:
        # raise_exception() in templates reports things like "roles must alternate
        # user/assistant": the request has to change, not the server.
        raise InvalidRequestError(
            f"the model's chat template rejected these messages: {exc.message or exc}; "
            "change the messages to fit the model's conversation format",
            param="messages",
        ) from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise InvalidRequestError(
            f"the model's chat template could not render these messages ({exc}); "
            "check the message fields the template expects",
            param="messages",
        ) from exc
