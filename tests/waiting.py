"""Waiting in a test for something another thread or process does, without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(predicate: Callable[[], bool], what: str, *, timeout_s: float = 60.0) -> None:
    """Returns once ``predicate()`` holds; fails the test, naming ``what``, if it does not
    within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)
