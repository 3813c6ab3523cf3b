"""What the gateway's OpenAPI schema says beyond what FastAPI infers from its routes.

The routes return plain dicts and ``Response`` objects (no ``response_model``: the server
never validates its own output), so their bodies are declared here from the models in
``openai_responses``, together with the statuses each route really answers with
(``http_errors`` maps every error to one body shape), the bearer key the /v1 routes need,
and the event stream a ``stream: true`` request gets. ``tests/platform/test_openapi.py``
checks real responses against the schema this produces.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from ember_platform import openai_responses as out

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "HEALTH",
    "METRICS",
    "MODELS",
    "READY",
    "SECURED",
    "USAGE",
    "install_openapi",
]

Responses = dict[int | str, dict[str, Any]]

_BEARER = "bearerAuth"
_REF = "#/components/schemas/{model}"

#: ``openapi_extra`` of every /v1 route: they all authenticate before anything else.
SECURED: dict[str, Any] = {"security": [{_BEARER: []}]}

# Models only named inside ``x-sse-data`` below, which FastAPI does not collect; the
# schema post-processing adds them to the components.
_STREAM_MODELS: tuple[type[BaseModel], ...] = (out.ChatCompletionChunk, out.TextCompletionChunk)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": out.ErrorResponse, "description": description, **extra}


_UNAUTHORIZED = _error(
    "No API key, or one that is unknown, revoked or expired (code invalid_api_key)."
)
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before sending the request again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    name = chunk.__name__
    return {
        "schema": {
            "type": "string",
            "description": (
                f"With `stream: true`: server-sent events, each `data:` line one JSON "
                f"{name}, or one ErrorResponse if the engine fails mid-stream; the last "
                "line is `data: [DONE]`. `x-sse-data` is the schema of each data line."
            ),
        },
        # OpenAPI 3.1 has no keyword for the schema of each event (3.2's itemSchema), so an
        # extension carries it, for clients and for the tests.
        "x-sse-data": {"oneOf": [_ref(chunk), _ref(out.ErrorResponse)]},
    }


def _generation(body: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """/v1/chat/completions and /v1/completions: every status their path can end in."""
    return {
        200: {
            "model": body,
            "description": f"A {body.__name__}; with `stream: true`, {chunk.__name__} events.",
            "content": {"text/event-stream": _event_stream(chunk)},
            "headers": {
                "X-Request-Id": {
                    "description": "The request's id (streamed responses only).",
                    "schema": {"type": "string"},
                }
            },
        },
        400: _error(
            "The body is not JSON or fails validation (unknown field, bad value), or the "
            "prompt plus max_tokens does not fit the model's context window."
        ),
        401: _UNAUTHORIZED,
        402: _error("The request could cost more than a spend cap has left (insufficient_quota)."),
        404: _error("The model is not served here (model_not_found); see GET /v1/models."),
        413: _error("The body is over this gateway's size limit (payload_too_large)."),
        429: _error(
            "Over the key's requests per minute, or tokens per minute (rate_limit_exceeded).",
            headers=_RETRY_AFTER,
        ),
        500: _error("The engine or its worker is down or failed before the response began."),
    }


CHAT = _generation(out.ChatCompletion, out.ChatCompletionChunk)
COMPLETIONS = _generation(out.TextCompletion, out.TextCompletionChunk)
MODELS: Responses = {200: {"model": out.ModelList}, 401: _UNAUTHORIZED}
USAGE: Responses = {
    200: {"model": out.UsageList},
    400: _error("period is not a calendar month like 2026-12."),
    401: _UNAUTHORIZED,
}
HEALTH: Responses = {200: {"model": out.Health, "description": "The process is up."}}
READY: Responses = {
    200: {"model": out.Readiness, "description": "Every model's engine is running."},
    503: {"model": out.Readiness, "description": "No model, or an engine is not running."},
}
METRICS: Responses = {200: {"description": "Prometheus text exposition format 0.0.4."}}
WORKERS: Responses = {
    200: {"model": out.WorkerList, "description": "Every worker, its state and cold start."}
}


def _finish(schema: dict[str, Any]) -> dict[str, Any]:
    # FastAPI documents a 422 HTTPValidationError on every route with a body or
    # parameters, but http_errors answers validation errors with 400 and ErrorResponse
    # (as OpenAI does), which the routes already declare.
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for model in _STREAM_MODELS:
        generated = model.model_json_schema(mode="serialization", ref_template=_REF)
        for name, definition in {**generated.pop("$defs", {}), model.__name__: generated}.items():
            if schemas.setdefault(name, definition) != definition:
                raise RuntimeError(
                    f"two different schemas are named {name!r} in the OpenAPI components; "
                    "rename one of the models in openai_responses"
                )
    components["securitySchemes"] = {
        _BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An Ember API key, ek_...; create one with `ember keys create`.",
        }
    }
    return schema


def install_openapi(app: FastAPI) -> None:
    """Makes ``app.openapi()`` (and /openapi.json, /docs) serve the finished schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
