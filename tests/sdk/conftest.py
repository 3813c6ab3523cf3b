"""The SDK runs against the same real gateway the platform tests use."""

from ..platform.conftest import Gateway, gateway_factory  # noqa: F401  (fixture re-export)
