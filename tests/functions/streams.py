"""Reading a request's stream in a test without letting a hang hang the test."""

from __future__ import annotations

import threading

import pytest

from ember_functions.engine import Completion
from ember_functions.stream import RequestStream

TIMEOUT_S = 60.0


def result_within(stream: RequestStream, timeout: float = TIMEOUT_S) -> Completion:
    """The stream's completion; its error raised; the test failed if it has not ended
    within ``timeout`` seconds."""
    box: list[Completion | BaseException] = []

    def read() -> None:
        try:
            box.append(stream.result())
        except BaseException as exc:
            box.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        pytest.fail(f"stream {stream.request_id} did not end within {timeout} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
