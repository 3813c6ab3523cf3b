"""Deferred imports: modules whose code runs on first use or once the worker is idle.

Pure-Python packages written to ``tmp_path`` show the import semantics; torch itself is
checked in new interpreters, deferred and not, which must generate the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember_functions.deferred_imports import DEFERRED_TORCH_MODULES, DeferredImports

Write = Callable[[str, str], None]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Write]:
    """``write("pkg/mod.py", source)``; the modules each append their name to ``ran``
    in ``deftest_log`` when their code runs. Leaves sys.modules and sys.meta_path clean."""
    (tmp_path / "deftest_log.py").write_text("ran = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before_modules, before_path = set(sys.modules), list(sys.meta_path)

    def write(rel: str, source: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))

    yield write
    sys.meta_path[:] = before_path
    for name in set(sys.modules) - before_modules:
        del sys.modules[name]


def _ran() -> list[str]:
    import deftest_log  # type: ignore[import-not-found]

    return list(deftest_log.ran)


def test_a_deferred_module_runs_on_first_use_and_once(package: Write) -> None:
    package("deftest_a/__init__.py", "from deftest_a import heavy\n")
    package(
        "deftest_a/heavy.py",
        "import deftest_log\ndeftest_log.ran.append(__name__)\nVALUE = 42\n",
    )
    deferred = DeferredImports(["deftest_a.heavy"])
    deferred.start()
    import deftest_a  # type: ignore[import-not-found]

    deferred.stop()
    heavy = sys.modules["deftest_a.heavy"]
    assert _ran() == [] and deferred.pending() == ["deftest_a.heavy"]
    # What the import system and inspect read does not run it.
    assert heavy.__file__.endswith("heavy.py") and heavy.__name__ == "deftest_a.heavy"
    assert _ran() == []
    assert deftest_a.heavy.VALUE == 42
    assert _ran() == ["deftest_a.heavy"] and deferred.pending() == []
    assert deftest_a.heavy.VALUE == 42 and _ran() == ["deftest_a.heavy"]
    # Its real loader is back: its source can be read, as a traceback would.
    assert "VALUE = 42" in heavy.__loader__.get_source("deftest_a.heavy")


def test_load_next_runs_each_pending_module_then_leaves_the_import_path(
    package: Write,
) -> None:
    for name in ("one", "two"):
        package(f"deftest_{name}.py", f"import deftest_log\ndeftest_log.ran.append({name!r})\n")
    deferred = DeferredImports(["deftest_one", "deftest_two", "deftest_never_imported"])
    deferred.start()
    import deftest_one  # type: ignore[import-not-found]  # noqa: F401
    import deftest_two  # type: ignore[import-not-found]  # noqa: F401

    deferred.stop()
    assert deferred in sys.meta_path
    assert deferred.load_next() == "deftest_one"
    assert deferred.load_next() == "deftest_two"
    assert deferred.load_next() is None
    assert _ran() == ["one", "two"]
    assert deferred not in sys.meta_path


def test_a_deferred_module_that_fails_leaves_as_a_failed_import_does(package: Write) -> None:
    package("deftest_bad.py", "import deftest_log\ndeftest_log.ran.append('bad')\n1 / 0\n")
    deferred = DeferredImports(["deftest_bad"])
    deferred.start()
    import deftest_bad  # type: ignore[import-not-found]

    deferred.stop()
    with pytest.raises(ZeroDivisionError):
        _ = deftest_bad.anything
    assert "deftest_bad" not in sys.modules and deferred.pending() == []
    with pytest.raises(ZeroDivisionError):  # imported again, it fails again
        import deftest_bad  # type: ignore[import-not-found]
    assert _ran() == ["bad", "bad"]


def test_a_module_imported_after_stop_is_not_deferred(package: Write) -> None:
    package("deftest_late.py", "import deftest_log\ndeftest_log.ran.append('late')\n")
    deferred = DeferredImports(["deftest_late"])
    deferred.start()
    deferred.stop()
    import deftest_late  # type: ignore[import-not-found]  # noqa: F401

    assert _ran() == ["late"] and deferred.pending() == []


def test_a_submodule_import_runs_its_deferred_package_first(package: Write) -> None:
    # The package imports the very submodule asked for: each runs once, package first,
    # and the submodule keeps its own spec.
    package(
        "deftest_pkg/__init__.py",
        "import deftest_log\ndeftest_log.ran.append('pkg')\nfrom deftest_pkg import sub\n",
    )
    package("deftest_pkg/sub.py", "import deftest_log\ndeftest_log.ran.append('sub')\nX = 1\n")
    package("deftest_pkg/other.py", "import deftest_log\ndeftest_log.ran.append('other')\n")
    deferred = DeferredImports(["deftest_pkg"])
    deferred.start()
    import deftest_pkg  # type: ignore[import-not-found]

    deferred.stop()
    assert _ran() == []
    import deftest_pkg.sub  # type: ignore[import-not-found]

    assert _ran() == ["pkg", "sub"]
    assert deftest_pkg.sub.X == 1
    spec = sys.modules["deftest_pkg.sub"].__spec__
    assert spec is not None and spec.origin is not None and spec.origin.endswith("sub.py")
    import deftest_pkg.other  # type: ignore[import-not-found]

    assert _ran() == ["pkg", "sub", "other"]


def test_between_start_and_stop_a_frame_s_module_is_found_without_a_scan() -> None:
    import inspect

    original = inspect.getmodule
    deferred = DeferredImports([])
    deferred.start()
    try:
        scanned_before = dict(inspect._filesbymodname)  # type: ignore[attr-defined]
        frame = sys._getframe()
        assert inspect.getmodule(frame) is sys.modules[__name__]
        # No module's file was looked up for it: the scan that cost torch's import
        # 30-40 ms did not run.
        assert inspect._filesbymodname == scanned_before  # type: ignore[attr-defined]
        # Code compiled from a string runs under some module's globals but is not that
        # module's: left to the original, which finds no module for it.
        code_frame = eval("__import__('sys')._getframe()", {"__name__": __name__})
        assert inspect.getmodule(code_frame) is None
        assert inspect.getmodule(inspect) is inspect
    finally:
        deferred.stop()
    assert inspect.getmodule is original
    deferred.stop()  # a second stop leaves it alone
    assert inspect.getmodule is original


_TORCH_RUN = """
import json, sys
from pathlib import Path
from ember_functions.deferred_imports import DeferredImports
deferred = DeferredImports()
if sys.argv[1] == "deferred":
    deferred.start()
import inspect, os
import torch
scanned_modules = len(inspect._filesbymodname)
threads_after_import = len(os.listdir("/proc/self/task"))
blas_env_before_stop = os.environ.get("OPENBLAS_NUM_THREADS")
deferred.stop()
blas_env_after_stop = os.environ.get("OPENBLAS_NUM_THREADS")
import numpy
blas_works = float(numpy.ones((3, 4)) @ numpy.ones(4) @ numpy.ones(3)) == 12.0
pending = deferred.pending()
rng_prims_at_stop = "torch._prims.rng_prims" in sys.modules
from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.sampling_params import SamplingParams
engine = LLMEngine.from_dir(
    Path(sys.argv[2]),
    config=EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16),
    model_name="tiny",
)
params = [SamplingParams(max_tokens=8, temperature=0.0),
          SamplingParams(max_tokens=8, temperature=0.8, seed=7)]
done = engine.generate(["hello there", "a seeded sample"], params)
pending_after_serving = deferred.pending()
loaded = []
while (name := deferred.load_next()) is not None:
    loaded.append(name)
export_usable = callable(torch.export.export)
from torch._opaque_base import OpaqueBaseMeta
print(json.dumps({
    "rng_prims_at_stop": rng_prims_at_stop,
    "rng_prims_at_end": "torch._prims.rng_prims" in sys.modules,
    "generator_metaclass_set": type(torch.Generator) is OpaqueBaseMeta,
    "pending": pending,
    "pending_after_serving": pending_after_serving,
    "loaded": loaded,
    "tokens": [c.token_ids for c in done],
    "left": deferred.pending(),
    "export_usable": export_usable,
    "scanned_modules": scanned_modules,
    "threads_after_import": threads_after_import,
    "blas_env_before_stop": blas_env_before_stop,
    "blas_env_after_stop": blas_env_after_stop,
    "blas_works": blas_works,
}))
"""


@pytest.mark.slow
def test_torch_with_its_deferred_modules_generates_the_same_tokens(
    tiny_model: Callable[..., Path],
) -> None:
    model_dir = tiny_model("llama")

    def run(mode: str) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-c", _TORCH_RUN, mode, str(model_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            # As a worker starts: nothing says how many threads numpy's BLAS may start.
            env={k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    deferred, full = run("deferred"), run("full")
    assert full["pending"] == [] and full["loaded"] == []
    # Nothing the engine does (build on the meta device, bind, greedy and seeded
    # sampling) runs a deferred module: they all wait for the idle worker.
    assert deferred["pending"] == list(DEFERRED_TORCH_MODULES)
    assert deferred["pending_after_serving"] == list(DEFERRED_TORCH_MODULES)
    assert deferred["tokens"] == full["tokens"]
    # Once idle, all of them ran: each by load_next, or by another one that uses it
    # (torch.export runs torch.optim and torch.compiler).
    assert deferred["left"] == [] and deferred["loaded"][0] == DEFERRED_TORCH_MODULES[0]
    assert set(deferred["loaded"]) <= set(DEFERRED_TORCH_MODULES)
    # The generator's metaclass was set without importing the module that sets it (and
    # the tracer it imports): that one ran once idle, with the meta registrations.
    assert deferred["rng_prims_at_stop"] is False and full["rng_prims_at_stop"] is True
    assert deferred["rng_prims_at_end"] and deferred["generator_metaclass_set"]
    assert full["generator_metaclass_set"]
    assert deferred["export_usable"] is True
    # torch's import registers a custom op, which looks up its caller's module: without
    # deferring, every loaded module's file is mapped for it (~1500, 30-40 ms).
    assert deferred["scanned_modules"] == 0 and full["scanned_modules"] > 500
    # numpy's OpenBLAS started no threads of its own (they spin on the other cores while
    # torch imports), and the setting that said so is gone again; its BLAS still works.
    assert deferred["threads_after_import"] == 1
    assert full["threads_after_import"] >= deferred["threads_after_import"]
    assert deferred["blas_env_before_stop"] == "1" and full["blas_env_before_stop"] is None
    assert deferred["blas_env_after_stop"] is None
    assert deferred["blas_works"] and full["blas_works"]
