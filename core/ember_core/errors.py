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


class WorkerUnavailableError(CapacityError):
    """No worker can run this model's requests now (it failed, or is stopping)."""

    code = "worker_unavailable"


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


class AuthenticationError(EmberError):
    """The API key is missing, malformed, unknown, revoked or expired."""

    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class BudgetExceededError(EmberError):
    """The request could cost more than what is left of a spend cap this period."""

    http_status = 402
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(
        self, message: str, *, remaining_micros: int = 0, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        #: What is left of the tightest cap, in integer micro-units of the currency.
        self.remaining_micros = remaining_micros


class RateLimitError(EmberError):
    """Too many tokens per minute for this key or tenant; retry after ``retry_after_s``."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class ConflictError(EmberError):
    """The request contradicts what is already recorded (settle after release, say)."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "conflict"
