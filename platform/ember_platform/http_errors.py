"""The one place errors become HTTP: status, OpenAI error body, and headers.

Every ``EmberError`` carries its status, OpenAI ``type`` and ``code`` (``ember_core.errors``);
this module turns one into a response, and maps the few errors that are not ours (a body
that is not JSON, a field of the wrong type, a body too large) onto the same shape, so a
client sees one format whatever went wrong:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ember_core.errors import EmberError, InvalidRequestError, RateLimitError

__all__ = [
    "PayloadTooLargeError",
    "PayloadTooLargeHTTP",
    "error_body",
    "error_response",
    "install_handlers",
]


class PayloadTooLargeError(InvalidRequestError):
    http_status = 413
    code = "payload_too_large"


class PayloadTooLargeHTTP(HTTPException):
    """Raised while a body is being read past the limit. An HTTPException because FastAPI
    turns any other exception raised while parsing a body into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is over {limit} bytes, this gateway's limit; send a shorter prompt",
        )


# Statuses Starlette raises itself (unknown route, wrong method), as OpenAI-shaped errors.
_HTTP_STATUS: dict[int, tuple[str, str, str]] = {
    404: ("invalid_request_error", "not_found", "no such route; see /docs for the API"),
    405: ("invalid_request_error", "method_not_allowed", "this route does not take that method"),
}


def error_body(message: str, error_type: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: EmberError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.code, exc.param),
        status_code=exc.http_status,
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}; remove it", param
    if kind == "missing":
        return f"missing required parameter: {param}", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    return f"invalid request: {where}{msg}", param


async def _on_ember(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, EmberError):  # registered for EmberError only
        raise exc
    return error_response(exc)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    message, param = _validation_message(exc)
    return error_response(InvalidRequestError(message, param=param))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):
        raise exc
    error_type, code, message = _HTTP_STATUS.get(
        exc.status_code, ("invalid_request_error", "http_error", str(exc.detail))
    )
    if exc.status_code == 413:
        code, message = "payload_too_large", str(exc.detail)
    return JSONResponse(
        error_body(message, error_type, code, None),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def install_handlers(app: Any) -> None:
    app.add_exception_handler(EmberError, _on_ember)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(HTTPException, _on_http)
