"""Shared foundations every Ember package may import: the error hierarchy."""

from ember_core.errors import (
    CapacityError,
    ConfigError,
    ContextLengthError,
    EmberError,
    EngineError,
    InvalidRequestError,
    ModelFormatError,
    ModelNotFoundError,
    NotFoundError,
    RequestCancelledError,
)

__all__ = [
    "CapacityError",
    "ConfigError",
    "ContextLengthError",
    "EmberError",
    "EngineError",
    "InvalidRequestError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NotFoundError",
    "RequestCancelledError",
]
