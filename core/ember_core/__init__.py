"""Shared foundations every Ember package may import: the error hierarchy."""

from ember_core.errors import (
    AuthenticationError,
    BudgetExceededError,
    CapacityError,
    ConfigError,
    ConflictError,
    ContextLengthError,
    EmberError,
    EngineError,
    InvalidRequestError,
    ModelFormatError,
    ModelNotFoundError,
    NotFoundError,
    RateLimitError,
    RequestCancelledError,
    WorkerUnavailableError,
)

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "CapacityError",
    "ConfigError",
    "ConflictError",
    "ContextLengthError",
    "EmberError",
    "EngineError",
    "InvalidRequestError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NotFoundError",
    "RateLimitError",
    "RequestCancelledError",
    "WorkerUnavailableError",
]
