"""Fixtures shared by every component's tests.

Heavy imports (torch, the engine) happen inside the fixtures, so collecting tests of
components that never touch a model stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

#: ``tiny_model(family="llama", dtype=torch.float32) -> model directory``
TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Returns a factory of tiny random Hugging Face model directories, one per
    ``(family, dtype)``, written once per test session.

    The directories are shared: tests that need a modified model copy one first
    (see ``copy_model`` in ``tests/functions/conftest.py``).
    """
    import torch
    from ember_functions.tiny import FAMILIES, write_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple[str, torch.dtype], Path] = {}

    def get(family: str = "llama", dtype: torch.dtype | None = None) -> Path:
        dtype = dtype or torch.float32
        key = (family, dtype)
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}"
            # A different seed per family, so no two families share their weights.
            cache[key] = write_tiny_model(
                root / name, family=family, seed=FAMILIES.index(family), dtype=dtype
            )
        return cache[key]

    return get
