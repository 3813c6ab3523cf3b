"""The one error hierarchy every Ember package raises.

Each class carries what the gateway needs to answer a client: the HTTP status, the
OpenAI error ``type`` and a stable ``code``. The gateway maps them in one table
(``ember_platform``), so a new error needs no new ``except`` anywhere else.

Messages follow one rule: say what was wrong and what to do about it.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base of every error Ember raises on purpose."""

    http_status: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"
    #: A client may retry the same request unchanged and expect it to succeed.
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EmberError):
    """The request itself is wrong: a bad value, a missing field, a bad shape."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class NotFoundError(EmberError):
    """A named thing (model, adapter, session, request) does not exist for this caller."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConfigError(EmberError):
    """Settings or a model's config files are wrong; raised at start, never mid-request."""

    http_status = 500
    error_type = "server_error"
    code = "config_error"


class ModelFormatError(EmberError):
    """Weights or model files are missing, truncated or inconsistent."""

    http_status = 500
    error_type = "server_error"
    code = "model_format_error"


class CapacityError(EmberError):
    """The engine cannot take this request right now; retrying later may work."""

    http_status = 503
    error_type = "server_error"
    code = "capacity"
    retryable = True


class RequestCancelledError(EmberError):
    """The request was cancelled (client went away or the caller cancelled it)."""

    http_status = 499
    error_type = "invalid_request_error"
    code = "cancelled"


class EngineError(EmberError):
    """The engine failed while running a request; the request ended, the engine did not."""

    http_status = 500
    error_type = "server_error"
    code = "engine_error"
    retryable = True
