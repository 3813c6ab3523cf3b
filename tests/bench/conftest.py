"""The bench scripts' private modules (``bench/_*.py``) are siblings, not a package: tests
load them by path, with ``bench/`` on the import path while they run their imports."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module, its own sibling imports (``_io_limits``...) found."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], ModuleType]:
    return load_bench_module
