"""Putting models into the store: an HF model directory becomes chunks plus a manifest.

Chunks are keyed by the sha256 of their raw bytes, so a fine-tune that shares tensors
with a model already stored (same bytes at the same place in the layout) writes only
the chunks that differ; the import report says how many bytes that saved.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember_core import ConfigError, ModelFormatError, NotFoundError
from ember_weights_store.codecs import choose_codec
from ember_weights_store.decode_file import DECODE_FILE, decode_only
from ember_weights_store.digests import fast_checksum, sha256_key
from ember_weights_store.host_tier import HostTier
from ember_weights_store.layout import chunk_ranges, plan_chunks
from ember_weights_store.manifest import (
    DEFAULT_CHUNK_SIZE_BYTES,
    DTYPE_SIZES,
    ChunkEntry,
    Manifest,
    model_key,
    validate_model_id,
)
from ember_weights_store.readahead import READAHEAD_THREADS, read_ahead
from ember_weights_store.tiers import CacheTier, ObjectNotFoundError, Tier
from ember_weights_store.verified import Readahead

if TYPE_CHECKING:  # imported where models are imported, not where they are read: see __init__
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def manifest_key(model_id: str, revision: str) -> str:
    return f"manifests/{model_key(model_id)}/{revision}.json"


#: zstd level for imports. Decoding costs the same at any level, and a model is imported
#: once and loaded many times, so pay at import: on SmolLM2's bf16 weights level 3 stores
#: 0.710 of the bytes, level 9 0.696 (3.5x the import time), level 19 0.668 (150x: too slow).
DEFAULT_IMPORT_LEVEL = 9

#: ``on_progress(done_bytes, total_bytes)``, called as chunks are stored.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportReport:
    model_id: str
    revision: str
    num_chunks: int
    raw_bytes: int
    stored_bytes: int  # bytes written now (chunks already stored are not rewritten)
    dedup_bytes: int  # raw bytes of chunks that were already in the store
    seconds: float


def _read_tensors(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name in out:
                        raise ModelFormatError(
                            f"tensor {name!r} appears in more than one shard ({path.name} "
                            "and an earlier one); the checkpoint is inconsistent"
                        )
                    out[name] = f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ModelFormatError(f"{path} is not a readable safetensors file: {exc}") from None
    return out


class WeightsStore:
    """Models in a stack of tiers, nearest first; the last tier is the origin that
    always holds everything (the object store or the local bucket).

    ``derived_tier`` is the host tier that holds what workers derive from a model's
    weights (packed and bound copies: ``packed_cache``, ``bound_cache``) when it holds
    no chunks itself; otherwise it is the host tier among ``tiers``, if any."""

    def __init__(self, tiers: Sequence[Tier], *, derived_tier: HostTier | None = None) -> None:
        if not tiers:
            raise ConfigError("a WeightsStore needs at least one tier (its origin)")
        in_tiers = next((t for t in tiers if isinstance(t, HostTier)), None)
        if in_tiers is not None and derived_tier is not None and derived_tier is not in_tiers:
            raise ConfigError(
                "a WeightsStore takes one host tier: pass it among the tiers (it holds "
                "chunks and derived copies) or as derived_tier (derived copies only)"
            )
        self.derived_tier = in_tiers or derived_tier
        for tier in tiers:
            if tier.holds_decoded and not isinstance(tier, CacheTier):
                raise ConfigError(
                    f"tier {tier.name!r} says it holds decoded chunks but has no read_into(); "
                    "implement CacheTier or set holds_decoded = False"
                )
        self.tiers = list(tiers)
        self._manifests: dict[str, tuple[bytes, Manifest]] = {}
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()

    def pool(self, threads: int) -> ThreadPoolExecutor:
        """This store's loader threads (``threads`` of them), started once and kept: starting
        eight threads costs a warm load of a small model a noticeable share of its time."""
        with self._pools_lock:
            pool = self._pools.get(threads)
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ember-load")
                self._pools[threads] = pool
            return pool

    @property
    def origin(self) -> Tier:
        return self.tiers[-1]

    def import_hf_dir(
        self,
        model_dir: Path,
        *,
        model_id: str,
        revision: str = "main",
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        level: int = DEFAULT_IMPORT_LEVEL,
        threads: int = 2,
        on_progress: ProgressFn | None = None,
    ) -> ImportReport:
        """Imports a Hugging Face model directory: every ``*.safetensors`` shard,
        ``config.json`` and the tokenizer files."""
        try:
            architecture = json.loads((model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(
                f"{model_dir}/config.json is missing or invalid: {exc}"
            ) from None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"no .safetensors files in {model_dir}; nothing to import")
        extras = {
            n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).is_file()
        }
        decoder = decode_only(extras["tokenizer.json"]) if "tokenizer.json" in extras else None
        if decoder is not None:  # what a worker parses to serve (decode_file.py)
            extras[DECODE_FILE] = decoder
        return self._import(
            _read_tensors(files),
            architecture,
            extras,
            model_id=model_id,
            revision=revision,
            chunk_size_bytes=chunk_size_bytes,
            level=level,
            threads=threads,
            on_progress=on_progress,
        )

    def import_safetensors_file(
        self,
        path: Path,
        *,
        model_id: str,
        revision: str = "main",
        architecture: dict[str, Any] | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        level: int = DEFAULT_IMPORT_LEVEL,
        threads: int = 2,
        on_progress: ProgressFn | None = None,
    ) -> ImportReport:
        """Imports one ``.safetensors`` file on its own: weights only, no tokenizer. The
        architecture is ``architecture`` if given, else a ``config.json`` beside the file,
        else empty (enough to store and load tensors, not to serve them)."""
        if not path.is_file():
            raise NotFoundError(f"{path} is not a file; pass a .safetensors file")
        if architecture is None:
            beside = path.parent / "config.json"
            try:
                architecture = json.loads(beside.read_text()) if beside.is_file() else {}
            except json.JSONDecodeError as exc:
                raise ModelFormatError(f"{beside} is not valid JSON: {exc}") from None
        return self._import(
            _read_tensors([path]),
            architecture,
            {},
            model_id=model_id,
            revision=revision,
            chunk_size_bytes=chunk_size_bytes,
            level=level,
            threads=threads,
            on_progress=on_progress,
        )

    def _import(
        self,
        tensors: dict[str, torch.Tensor],
        architecture: dict[str, Any],
        extra_files: dict[str, bytes],
        *,
        model_id: str,
        revision: str,
        chunk_size_bytes: int,
        level: int,
        threads: int,
        on_progress: ProgressFn | None,
    ) -> ImportReport:
        started = time.perf_counter()
        validate_model_id(model_id)
        if self.origin.holds_decoded:
            raise ConfigError(
                f"the store's last tier {self.origin.name!r} is a cache; import into an "
                "object tier (a local bucket or S3) as the origin"
            )
        import torch

        specs = [
            (
                name,
                str(t.dtype).removeprefix("torch."),
                tuple(t.shape),
                t.numel() * t.element_size(),
            )
            for name, t in tensors.items()
        ]
        entries, sizes = plan_chunks(specs, chunk_size_bytes=chunk_size_bytes)
        buffers = {dtype: torch.zeros(size, dtype=torch.uint8) for dtype, size in sizes.items()}
        for e in entries:
            flat = tensors[e.name].contiguous().view(-1).view(torch.uint8)
            buffers[e.dtype][e.offset_bytes : e.end_bytes] = flat
        del tensors
        plan = [
            (dtype, offset, size)
            for dtype, buf in buffers.items()
            for offset, size in chunk_ranges(buf.numel(), chunk_size_bytes=chunk_size_bytes)
        ]
        total = sum(size for _, _, size in plan)
        lock = threading.Lock()
        counts = {"written": 0, "dedup": 0, "done": 0}

        def one(dtype: str, offset: int, size: int) -> ChunkEntry:
            raw = memoryview(buffers[dtype][offset : offset + size].numpy())  # type: ignore[arg-type]
            key = sha256_key(raw)
            # Encoding is deterministic for a level, so a chunk already stored gets the
            # same codec and size it was stored with; only new chunks are written.
            dtype_bytes = DTYPE_SIZES[dtype]
            codec, stored = choose_codec(raw, dtype_bytes=dtype_bytes, level=level)
            new = not self.origin.has(key)
            if new:
                self.origin.put(key, stored)
            with lock:
                counts["written" if new else "dedup"] += len(stored) if new else size
                counts["done"] += size
                if on_progress is not None:
                    on_progress(counts["done"], total)
            return ChunkEntry(key, codec, size, len(stored), dtype, offset, fast_checksum(raw))

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            chunks = list(pool.map(lambda p: one(*p), plan))
        tokenizer_files = {}
        for name, data in extra_files.items():
            tokenizer_files[name] = sha256_key(data)
            self.origin.put(tokenizer_files[name], data)
        manifest = Manifest(
            model_id=model_id,
            revision=revision,
            architecture=architecture,
            tokenizer_files=tokenizer_files,
            tensors=tuple(entries),
            chunks=tuple(chunks),
            chunk_size_bytes=chunk_size_bytes,
        )
        self.origin.put(manifest_key(model_id, revision), manifest.to_json().encode())
        return ImportReport(
            model_id=model_id,
            revision=revision,
            num_chunks=len(chunks),
            raw_bytes=total,
            stored_bytes=counts["written"],
            dedup_bytes=counts["dedup"],
            seconds=time.perf_counter() - started,
        )

    def manifest(self, model_id: str, revision: str = "main") -> Manifest:
        key = manifest_key(validate_model_id(model_id), revision)
        for tier in self.tiers:
            with contextlib.suppress(ObjectNotFoundError):
                raw = tier.get(key)
                # Parsing and validating a big model's manifest costs milliseconds on every
                # load; the same bytes always parse to the same (immutable) manifest.
                cached = self._manifests.get(key)
                if cached is not None and cached[0] == raw:
                    return cached[1]
                manifest = Manifest.from_json(raw.decode())
                self._manifests[key] = (raw, manifest)
                return manifest
        raise NotFoundError(
            f"model {model_id!r} revision {revision!r} is not in the store "
            f"(tiers: {', '.join(t.name for t in self.tiers)}); import it first"
        )

    def readahead(
        self,
        model_id: str,
        revision: str = "main",
        *,
        threads: int = READAHEAD_THREADS,
        fetch: bool = True,
        manifest: Manifest | None = None,
    ) -> Readahead:
        """The model's chunks brought to this machine's nearest tiers and into the page
        cache, checked on the way (``readahead.read_ahead``): what a new worker does while
        torch imports, in a child process (``early_readahead``), so the loader finds them
        there, checked (``verified``). ``manifest``: the model's, if read already. Imports
        nothing heavy: see ``__init__``."""
        return read_ahead(self, model_id, revision, threads=threads, fetch=fetch, manifest=manifest)

    def list_models(self) -> list[tuple[str, str]]:
        """(model id, revision) of every model the origin holds, sorted."""
        found = []
        for key in _keys(self.origin):
            if key.startswith("manifests/") and key.endswith(".json"):
                _, folder, rev = key.split("/", 2)
                found.append((folder.replace("--", "/"), rev.removesuffix(".json")))
        return sorted(found)

    def remove_model(self, model_id: str) -> int:
        """Deletes every revision of ``model_id`` from every tier, then every chunk and
        tokenizer blob no remaining model references (others' shared chunks stay). Manifests
        go first, so a concurrent load sees the model gone, never half of it. Returns the
        number of objects deleted."""
        validate_model_id(model_id)
        revisions = [rev for mid, rev in self.list_models() if mid == model_id]
        if not revisions:
            raise NotFoundError(f"model {model_id!r} is not in the store; nothing to remove")
        deleted = 0
        for tier in self.tiers:
            for rev in revisions:
                deleted += tier.delete(manifest_key(model_id, rev))
        live: set[str] = set()
        for mid, rev in self.list_models():
            m = self.manifest(mid, rev)
            live |= {c.hash for c in m.chunks} | set(m.tokenizer_files.values())
        for tier in self.tiers:
            for key in _keys(tier):
                if key.startswith("sha256:") and key not in live:
                    deleted += tier.delete(key)
        return deleted

    def tokenizer_file(self, manifest: Manifest, name: str) -> bytes:
        key = manifest.tokenizer_files[name]
        for tier in self.tiers:
            with contextlib.suppress(ObjectNotFoundError):
                data = tier.get(key)
                if sha256_key(data) == key:
                    return data
        raise ModelFormatError(
            f"{name} of {manifest.model_id} ({key}) has no good copy in any tier; re-import it"
        )


def _keys(tier: Tier) -> list[str]:
    """Every key ``tier`` holds; every tier Ember ships can list its keys."""
    lister = getattr(tier, "keys", None)
    if lister is None:
        raise ConfigError(f"tier {tier.name!r} cannot list its keys; add a keys() method")
    return list(lister())
