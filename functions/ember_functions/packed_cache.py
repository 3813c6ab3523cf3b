"""Packed matrices kept in the host tier, so a machine's workers of a model share one copy.

A worker packs its matrices into oneDNN's blocked layout once it is idle (``Linear.pack``):
a private copy of the model per worker (SmolLM2 in bf16: 0.26 GB; the 1.1B model in
float32: 4.4 GB), built at ~0.15 s per GB, and until it is built the worker's requests run
the slower unpacked matmuls. The blocked bytes depend only on the matrix, the dtype, the
row count it is packed for and the machine (CPU and torch build), so the first worker of
a model to finish packing writes them into the machine's host tier: one flat object, and
an index that holds each matrix's place and oneDNN memory descriptor, written last. Every
later worker maps the object and wraps each matrix around its bytes without copying
them: it runs packed from its first request, and the packed bytes are in RAM once however
many workers use them.

oneDNN's packed tensors have no storage torch can hand out, so the bridge is torch's own
C shim for AOTInductor: ``aoti_torch_create_tensor_from_blob_v2`` builds a packed tensor
over given bytes and a serialized descriptor (``torch.ops.mkldnn._get_mkldnn_serialized_md``
reads one), and ``torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr`` turns its handle
into a Python tensor. Both are torch internals, found through ctypes: a worker stores its
matrices only if :func:`sharing_works` (a round trip computes, to the bit, what the
matrix packed here does), and a worker that loads them checks the same of their first
matrix; where either fails, every worker packs its own, as before. The wrapped tensors do
not own their bytes: the model holds the mapping for as long as it holds them.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import platform
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember_functions.bound_cache import manifest_digest
from ember_functions.linear import onednn_linear
from ember_weights_store.host_lease import HostLease
from ember_weights_store.host_tier import HostTier
from ember_weights_store.manifest import Manifest
from ember_weights_store.mapping import map_chunk_files, populate_file_pages

__all__ = ["PackedCache", "SharedPacked", "sharing_works"]

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1  # bump when the object's or the index's layout changes
_ALIGN = 64  # bytes: every matrix starts on a cache line, as oneDNN's own buffers do
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16)}


@dataclass(frozen=True)
class SharedPacked:
    """Packed matrices mapped from the host tier, by name (``layers.3.qkv``, ``head``).
    ``backing`` is the mapping their bytes live in: keep it while any matrix is used."""

    matrices: dict[str, torch.Tensor]
    backing: torch.Tensor


@dataclass(frozen=True)
class PackedCache:
    """One model's packed matrices, in one compute dtype, on this machine's host tier.

    Example::

        cache = PackedCache.for_model(host_tier, manifest, torch.bfloat16, pack_rows=512)
        shared = cache.load(model.matrices_to_check(), pack=linear.pack)  # None: a miss
        if shared is None:
            ...                                    # pack, then:
            stored = cache.store_in_background(model.packed_matrices())
            ...                                    # once stored.result(), map it as above
    """

    host: HostTier
    key: str  # of the data object; the index is key + "-index"
    dtype: torch.dtype
    pack_rows: int

    @classmethod
    def for_model(
        cls, host: HostTier, manifest: Manifest, dtype: torch.dtype, *, pack_rows: int
    ) -> PackedCache:
        name = str(dtype).removeprefix("torch.")
        return cls(
            host,
            f"packed/{manifest_digest(manifest)}-{name}-r{pack_rows}-{_machine_tag()}"
            f"-v{_FORMAT_VERSION}",
            dtype,
            pack_rows,
        )

    @property
    def index_key(self) -> str:
        return f"{self.key}-index"

    def lease(self, *, holder: str, stale_s: float) -> HostLease:
        """The lease one engine on the machine holds while it packs these matrices for
        all (``Packing.pack``): the others wait for its copy instead of packing their own."""
        return HostLease(
            self.host.root,
            "pack-" + self.key.removeprefix("packed/"),
            holder=holder,
            stale_s=stale_s,
        )

    def available(self) -> bool:
        """Whether a complete entry is there to load (cheap: no reading, no probing)."""
        return self.host.has(self.index_key)

    def load(
        self,
        plain: Mapping[str, torch.Tensor],
        *,
        pack: Callable[[torch.Tensor], torch.Tensor | None],
    ) -> SharedPacked | None:
        """The packed matrices, mapped and wrapped; None if absent, incomplete, not for
        ``plain`` (the unpacked matrices, by the same names), or if wrapping does not work
        here. The first matrix is checked: wrapped, it must compute to the bit what it
        computes packed here with ``pack``, or nothing is used (the same check as
        :func:`sharing_works`, on a real matrix: a loading worker runs only this one)."""
        if not plain or not self.available() or _blob_api() is None:
            return None
        try:
            index = json.loads(self.host.get(self.index_key))
            entries = index["tensors"]
            shapes = {n: tuple(e["shape"]) for n, e in entries.items()}
            if index["pack_rows"] != self.pack_rows or shapes != {
                n: tuple(t.shape) for n, t in plain.items()
            }:
                log.warning("packed matrices %s do not match the model; packing instead", self.key)
                return None
            # Pinned for this process's life: the matrices are views of the mapping.
            self.host.pin([self.key, self.index_key], owner=f"packed-{os.getpid()}")
            size = index["size_bytes"]
            backing = map_chunk_files([(self.host.object_path(self.key), 0, size)], size)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("packed matrices %s unreadable (%s); packing instead", self.key, exc)
            return None
        base = backing.data_ptr()
        try:
            matrices = {
                name: _wrap(
                    base + e["offset"], e["shape"], _DTYPES[e["dtype"]], bytes.fromhex(e["md"])
                )
                for name, e in entries.items()
            }
        except (RuntimeError, KeyError, ValueError) as exc:
            log.warning("packed matrices %s cannot be wrapped (%s); packing instead", self.key, exc)
            return None
        name, first = next(iter(plain.items()))
        packed_here = pack(first)
        if packed_here is None or not _same_product(matrices[name], packed_here, first):
            log.warning("packed matrices %s compute differently here; packing instead", self.key)
            return None
        # The next step reads every matrix: their pages are mapped now, in one call, not
        # faulted in a few at a time by the request a new worker was started for.
        populate_file_pages(base, size)
        return SharedPacked(matrices, backing)

    def store(self, matrices: Mapping[str, torch.Tensor]) -> bool:
        """Writes ``matrices`` (packed): the data object, then the index that makes it
        visible; True once both are there. Each matrix goes from oneDNN's buffer straight
        to the tier, so storing needs no model-sized copy. Stores nothing where no worker
        could wrap them back (:func:`sharing_works`). A full tier is not an error: the
        next worker packs, as this one did."""
        if not sharing_works(self.dtype):
            return False
        if self.available():
            return True  # another worker's, identical: this one maps that instead
        entries: dict[str, dict[str, Any]] = {}
        pieces: list[memoryview] = []
        offset = 0
        for name, packed in matrices.items():
            pad = -offset % _ALIGN
            if pad:
                pieces.append(memoryview(bytes(pad)))
                offset += pad
            nbytes = torch.ops.mkldnn._nbytes(packed)
            entries[name] = {
                "dtype": str(packed.dtype).removeprefix("torch."),
                "shape": list(packed.shape),
                "offset": offset,
                "nbytes": nbytes,
                "md": bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).tolist()).hex(),
            }
            address = torch.ops.mkldnn.data_ptr(packed)
            pieces.append(memoryview((ctypes.c_char * nbytes).from_address(address)))
            offset += nbytes
        try:
            # If two workers store at once, the first write of each object stays: the
            # other's would orphan a copy the first worker may map by then.
            self.host.put_if_absent(self.key, pieces)
            index = {"size_bytes": offset, "pack_rows": self.pack_rows, "tensors": entries}
            self.host.put_if_absent(self.index_key, json.dumps(index).encode())
        except Exception as exc:  # a cache: every worker can still pack its own
            log.warning("could not keep packed matrices %s in the host tier: %s", self.key, exc)
            return False
        return True

    def store_in_background(self, matrices: Mapping[str, torch.Tensor]) -> Future[bool]:
        """:meth:`store` on a thread, while the worker that packed serves; the future
        holds its result. The thread holds the matrices (their buffers are written out)
        until it is done."""
        done: Future[bool] = Future()
        held = dict(matrices)

        def run() -> None:
            try:
                done.set_result(self.store(held))
            except BaseException as exc:  # the worker serves on, unshared
                log.warning("could not keep packed matrices %s: %s", self.key, exc)
                done.set_result(False)

        threading.Thread(target=run, name="ember-packed-store", daemon=True).start()
        return done


def _machine_tag() -> str:
    """What the blocked layout depends on besides the matrix: the torch (and oneDNN)
    build and the instruction set. The host tier is this machine's RAM, so this only
    guards against a torch upgraded under a tier that outlived it."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    version = torch.__version__.replace("+", "-")
    return f"{platform.machine()}-{capability}-torch{version}"


def _same_product(wrapped: torch.Tensor, packed_here: torch.Tensor, plain: torch.Tensor) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, plain.shape[1], generator=gen).to(plain.dtype)
    return torch.equal(onednn_linear(x, wrapped, None), onednn_linear(x, packed_here, None))


class _BlobApi:
    """torch's C shim entry points (see the module docstring), looked up once."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        for name in ("aoti_torch_layout__mkldnn", "aoti_torch_device_type_cpu"):
            getattr(lib, name).restype = ctypes.c_int32
        self.layout = lib.aoti_torch_layout__mkldnn()
        self.cpu = lib.aoti_torch_device_type_cpu()
        self.dtypes = {}
        for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            fn = getattr(lib, f"aoti_torch_dtype_{name}")
            fn.restype = ctypes.c_int32
            self.dtypes[dtype] = fn()
        create = lib.aoti_torch_create_tensor_from_blob_v2
        create.restype = ctypes.c_int32
        i64p = ctypes.POINTER(ctypes.c_int64)
        create.argtypes = [
            *(ctypes.c_void_p, ctypes.c_int64, i64p, i64p, ctypes.c_int64),  # data .. offset
            *(ctypes.c_int32, ctypes.c_int32, ctypes.c_int32),  # dtype, device type, index
            *(ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32),  # out handle, layout
            *(ctypes.c_char_p, ctypes.c_int64),  # serialized descriptor
        ]
        self.create = create
        # A prototype of our own: setting argtypes on ctypes.pythonapi's would change them
        # for everyone in the process.
        prototype = ctypes.PYFUNCTYPE(
            ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p
        )
        self.capsule = prototype(("PyCapsule_New", ctypes.pythonapi))
        self.steal = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr


@functools.cache
def _blob_api() -> _BlobApi | None:
    try:
        return _BlobApi()
    except (OSError, AttributeError) as exc:
        log.info("packed matrices cannot be shared in this torch build (%s)", exc)
        return None


def _wrap(address: int, shape: list[int], dtype: torch.dtype, md: bytes) -> torch.Tensor:
    """A packed tensor over the bytes at ``address`` (not copied, not owned)."""
    api = _blob_api()
    if api is None:
        raise RuntimeError("packed matrices cannot be wrapped in this torch build")
    sizes = (ctypes.c_int64 * len(shape))(*shape)
    strides = (ctypes.c_int64 * len(shape))(*torch.empty(shape, device="meta").stride())
    handle = ctypes.c_void_p()
    rc = api.create(
        address, len(shape), sizes, strides, 0, api.dtypes[dtype], api.cpu, 0,
        ctypes.byref(handle), api.layout, md, len(md),
    )  # fmt: skip
    if rc != 0 or not handle.value:
        raise RuntimeError(f"torch could not wrap a packed {dtype} matrix of shape {shape}")
    return api.steal(api.capsule(handle.value, None, None))


@functools.cache
def sharing_works(dtype: torch.dtype) -> bool:
    """Whether a packed ``dtype`` matrix survives the trip through bytes here: written
    out, wrapped back, and computing to the bit what the original does. Probed once per
    process and dtype."""
    if _blob_api() is None or dtype not in _DTYPES.values():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(32, 64, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        nbytes = torch.ops.mkldnn._nbytes(packed)
        md = bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).tolist())
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        ctypes.memmove(buffer.data_ptr(), torch.ops.mkldnn.data_ptr(packed), nbytes)
        wrapped = _wrap(buffer.data_ptr(), list(w.shape), dtype, md)
        ok = _same_product(wrapped, packed, w)
        del wrapped  # before the buffer it points into
        return ok
    except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
        log.info("packed matrices cannot be shared here (%s)", exc)
        return False
