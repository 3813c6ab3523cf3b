"""Parts of torch a new worker interpreter imports only once it is idle.

``import torch`` imports nearly all of torch, ~0.9-1.7 s on this machine's cores: the
largest phase of a cold start in a new interpreter. Some of it serves only tracing,
export, training and tensor types an inference engine never makes:

- ``torch.export`` (and ``torch._export``, which it imports);
- ``torch._meta_registrations``: the Python meta kernels that fake tensors and the
  compilers trace with, and the decompositions and references it imports
  (``torch._decomp``, ``torch._refs``);
- ``torch.distributed._meta_registrations``: the same for collectives;
- ``torch.nested``, ``torch.distributions``, ``torch.masked`` and ``torch.sparse``: tensor
  types and distributions an inference engine does not make;
- ``torch.profiler`` and ``torch.utils.data`` (profiling, and data loaders for training);
- ``torch.optim`` (optimizers), ``torch.nn.intrinsic`` (the old name of the fused modules
  quantized training makes), ``torch.quasirandom`` (Sobol sequences) and ``torch.compiler``
  (the compilers' front door): ~20 ms together.

Not ``torch.quantization`` (~50 ms), though nothing serving uses it: torch's package
imports it before ``torch._higher_order_ops``, and deferred, that one's import of the
proxy-tensor tracer meets a partly initialised module and fails. ``torch.func``,
``torch.hub`` and ``torch.testing`` are reached by ``from X import name`` while torch
imports, which runs a deferred module at once.

A worker started as a new interpreter installs :class:`DeferredImports` before it imports
torch. torch's own ``from torch import export`` then binds a module object that holds its
name, file and spec but has not run its code; the first access to any other attribute
runs it, so code that uses one of these modules gets it whole. Modules that take effect
by being imported (the meta registrations) have no such trigger: the worker runs all of
them once it is READY and idle (``ServeLoop``), after the work that speeds up requests.
A worker that has served and idled holds torch as ``import torch`` leaves it.

Deferring changes the order torch's modules import in, and torch has one dependency on
that order that its imports do not state: ``torch.Generator()`` raises until
``torch._prims.rng_prims`` has set the generator's metaclass, and that module is imported
by ``torch._meta_registrations``, deferred. Importing it takes 65-75 ms (it imports the
proxy-tensor tracer and the higher-order ops), nearly all of it for tracing: so
:func:`DeferredImports.stop` sets the metaclass itself, as that module's last lines do
(``OpaqueBaseMeta``, one call into ``torch._C``), and the module runs once idle with the
meta registrations that import it (or at ``stop`` after all, on a torch without that
call). ``tests/functions/test_deferred_imports.py`` checks, in a new interpreter, that
torch with these modules deferred runs the engine to the same tokens; if a torch upgrade
adds another such dependency, it fails there.

One more thing slows torch's import for no use to a worker: registering a custom op
(``torch.utils._debug_mode`` registers one) records where the registration came from,
with ``inspect.getframeinfo`` and ``inspect.getmodule`` on the caller's frame. For an
object without ``__module__`` the first such call maps every module loaded so far to its
real path, a ``realpath`` each: ~1500 modules, 30-40 ms here. Between :meth:`start` and
:meth:`stop` a frame running a module's own code is answered with that module (its
globals' ``__name__``, whose ``__file__`` is the frame's file): the module the scan finds.

And one thing costs the other core: numpy's wheels bundle OpenBLAS, which starts a thread
per further core as numpy is imported (torch imports it), and each spins ~0.1 s waiting
for work that never comes: a worker computes nothing with numpy's BLAS (torch brings its
own, loaded before numpy). On two cores that thread takes the core the router's parse and
the readahead child run on. While deferring, numpy is imported with
``OPENBLAS_NUM_THREADS=1`` (unless the environment sets it), and the variable is gone
again at :meth:`stop`, so nothing started later inherits it.

Only for a worker's own new interpreter: a zygote imports all of torch once for all the
workers it forks (each would otherwise run the deferred modules again).

Example::

    deferred = DeferredImports()
    deferred.start()
    import torch            # without the deferred modules' code
    deferred.stop()
    ...
    while deferred.load_next() is not None:  # once idle: one module at a time
        pass
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import threading
import types
from collections.abc import Callable, Sequence

__all__ = ["DEFERRED_TORCH_MODULES", "NUMPY_BLAS_THREADS", "DeferredImports"]

DEFERRED_TORCH_MODULES = (
    "torch.export",
    "torch._meta_registrations",
    "torch.distributed._meta_registrations",
    "torch.nested",
    "torch.distributions",
    "torch.masked",
    "torch.sparse",
    "torch.profiler",
    "torch.utils.data",
    "torch.optim",
    "torch.nn.intrinsic",
    "torch.quasirandom",
    "torch.compiler",
)

# What numpy's bundled OpenBLAS reads, as numpy loads it, for how many threads to start.
NUMPY_BLAS_THREADS = "OPENBLAS_NUM_THREADS"

# Sets torch.Generator's metaclass, without which ``torch.Generator()`` raises (see the
# module's docstring); imported by torch._meta_registrations.
_RNG_PRIMS = "torch._prims.rng_prims"


class _Deferred(types.ModuleType):
    """A module whose code has not run yet: any attribute it lacks runs it first."""

    def __getattr__(self, name: str) -> object:
        _run(self)
        return getattr(self, name)


def _run(module: types.ModuleType) -> None:
    spec = module.__spec__
    if spec is None or not isinstance(spec.loader, _DeferringLoader):
        return  # it ran already (on another path into it)
    real = spec.loader.real
    # Back to a plain module with its real loader first: the code it runs may import
    # itself or read its own source (``inspect``, tracebacks) through its loader.
    module.__class__ = types.ModuleType
    spec.loader = real
    module.__loader__ = real
    try:
        real.exec_module(module)
    except BaseException:
        # As a failed import leaves it: gone, so the next import tries again and raises.
        sys.modules.pop(module.__name__, None)
        raise


class _DeferringLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__class__ = _Deferred  # its code runs on first use, or in load_next


class _AlreadyLoaded(importlib.abc.Loader):
    """Hands the import system a module that was imported while it looked for it.

    The import system then loads whatever spec the module has (not the finder's), so
    the module wears this loader's spec until loaded, when its own comes back."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.own_spec = module.__spec__

    @classmethod
    def spec_for(cls, module: types.ModuleType) -> importlib.machinery.ModuleSpec:
        spec = importlib.machinery.ModuleSpec(module.__name__, cls(module))
        module.__spec__ = spec
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.own_spec


def _set_generator_metaclass() -> None:
    """What ``torch._prims.rng_prims`` does for ``torch.Generator()``, without importing
    it (~70 ms); that module sets it again when it runs, to the same class."""
    import torch

    setter = getattr(torch._C, "_set_generator_metaclass", None)
    try:
        from torch._opaque_base import OpaqueBaseMeta
    except ImportError:
        setter = None
    if setter is None:  # another torch: the module itself, as torch would import it
        importlib.import_module(_RNG_PRIMS)
        return
    setter(OpaqueBaseMeta)


def _quick_frame_modules() -> Callable[[], None]:
    """Makes ``inspect.getmodule(frame)`` answer a module's own frame at once, without
    mapping every loaded module's file first (the module docstring says why); returns what
    puts the original back."""
    original = inspect.getmodule

    def getmodule(object: object, _filename: str | None = None) -> types.ModuleType | None:
        # ``object``: inspect's own parameter name, which a caller may pass by keyword.
        frame = object
        if isinstance(frame, types.FrameType):
            module = sys.modules.get(frame.f_globals.get("__name__", ""))
            if module is not None and getattr(module, "__file__", None) == frame.f_code.co_filename:
                return module
        return original(frame, _filename)

    inspect.getmodule = getmodule

    def restore() -> None:
        if inspect.getmodule is getmodule:
            inspect.getmodule = original

    return restore


class DeferredImports(importlib.abc.MetaPathFinder):
    """Defers ``names`` (those imported between :meth:`start` and :meth:`stop`) until
    they are used or :meth:`load_next` runs them."""

    def __init__(self, names: Sequence[str] = DEFERRED_TORCH_MODULES) -> None:
        self.names = tuple(names)
        self._deferring = False
        self._finding = threading.local()  # per thread: imports run on several at once
        self._restore_getmodule: Callable[[], None] | None = None
        self._set_blas_threads = False  # whether it set NUMPY_BLAS_THREADS, to unset

    def start(self) -> None:
        """Defers these modules' code from now on; call it before importing torch."""
        self._deferring = True
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)
        if self._restore_getmodule is None:
            self._restore_getmodule = _quick_frame_modules()

    def stop(self) -> None:
        """Defers nothing more (an ``import`` of a module still deferred returns it as
        it is); imports what torch needs whatever was deferred."""
        self._deferring = False
        if self._restore_getmodule is not None:
            self._restore_getmodule()
            self._restore_getmodule = None
        if self._set_blas_threads:
            os.environ.pop(NUMPY_BLAS_THREADS, None)
            self._set_blas_threads = False
        if "torch" in sys.modules and _RNG_PRIMS not in sys.modules:
            _set_generator_metaclass()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if getattr(self._finding, "active", False):
            return None
        if fullname == "numpy" and self._deferring and NUMPY_BLAS_THREADS not in os.environ:
            os.environ[NUMPY_BLAS_THREADS] = "1"  # see the module's docstring
            self._set_blas_threads = True
        parent = sys.modules.get(fullname.rpartition(".")[0])
        if isinstance(parent, _Deferred):
            # A package runs before its submodules, as without deferring; running it may
            # import the very submodule being looked for.
            _run(parent)
            if (module := sys.modules.get(fullname)) is not None:
                return _AlreadyLoaded.spec_for(module)
        if not self._deferring or fullname not in self.names:
            return None
        self._finding.active = True  # the real finders' spec, found without this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.active = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _DeferringLoader(spec.loader)
        return spec

    def pending(self) -> list[str]:
        """The deferred modules whose code has not run yet."""
        return [n for n in self.names if isinstance(sys.modules.get(n), _Deferred)]

    def load_next(self) -> str | None:
        """Runs one deferred module's code (a fraction of a second, holding the GIL);
        returns its name, or None when none is left (this finder then leaves
        ``sys.meta_path``)."""
        pending = self.pending()
        if not pending:
            if not self._deferring and self in sys.meta_path:
                sys.meta_path.remove(self)
            return None
        _run(sys.modules[pending[0]])
        return pending[0]
