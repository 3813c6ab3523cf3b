"""Putting models into the store: an HF model directory becomes chunks plus a manifest.

Chunks are keyed by the sha256 of their raw bytes, so a fine-tune that shares tensors
with a model already stored (same bytes at the same place in the layout) writes only
the chunks that differ; the import report says how many bytes that saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ember_core import ModelFormatError, NotFoundError
from ember_weights_store.codecs import choose_codec
from ember_weights_store.layout import chunk_ranges, plan_chunks
from ember_weights_store.manifest import (
    DEFAULT_CHUNK_SIZE_BYTES,
    ChunkEntry,
    Manifest,
    model_key,
    validate_model_id,
)
from ember_weights_store.tiers import ObjectNotFoundError, Tier

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def manifest_key(model_id: str, revision: str) -> str:
    return f"manifests/{model_key(model_id)}/{revision}.json"


def blob_key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImportReport:
    model_id: str
    revision: str
    num_chunks: int
    raw_bytes: int
    stored_bytes: int  # bytes written now (chunks already stored are not rewritten)
    dedup_bytes: int  # raw bytes of chunks that were already in the store
    seconds: float


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"no .safetensors files in {model_dir}; nothing to import")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                out[name] = f.get_tensor(name)
    return out


class WeightsStore:
    """Models in a stack of tiers, nearest first; the last tier is the origin that
    always holds everything (the object store or the local bucket)."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise ValueError("a WeightsStore needs at least one tier (its origin)")
        self.tiers = list(tiers)

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
        level: int = 3,
    ) -> ImportReport:
        started = time.perf_counter()
        validate_model_id(model_id)
        try:
            architecture = json.loads((model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(
                f"{model_dir}/config.json is missing or invalid: {exc}"
            ) from None
        tensors = _read_tensors(model_dir)
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
        chunks: list[ChunkEntry] = []
        written = dedup = raw_total = 0
        for dtype, buf in buffers.items():
            dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            for offset, size in chunk_ranges(buf.numel(), chunk_size_bytes=chunk_size_bytes):
                raw = buf[offset : offset + size].numpy().tobytes()
                key = blob_key(raw)
                raw_total += size
                # Encoding is deterministic for a level, so a chunk already stored gets
                # the same codec and size it was stored with; only new chunks are written.
                codec, stored = choose_codec(raw, dtype_bytes=dtype_bytes, level=level)
                stored_size = len(stored)
                if self.origin.has(key):
                    dedup += size
                else:
                    self.origin.put(key, stored)
                    written += stored_size
                chunks.append(ChunkEntry(key, codec, size, stored_size, dtype, offset))
        tokenizer_files = {}
        for name in TOKENIZER_FILES:
            path = model_dir / name
            if path.is_file():
                data = path.read_bytes()
                tokenizer_files[name] = blob_key(data)
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
            raw_bytes=raw_total,
            stored_bytes=written,
            dedup_bytes=dedup,
            seconds=time.perf_counter() - started,
        )

    def manifest(self, model_id: str, revision: str = "main") -> Manifest:
        key = manifest_key(validate_model_id(model_id), revision)
        for tier in self.tiers:
            with contextlib.suppress(ObjectNotFoundError):
                return Manifest.from_json(tier.get(key).decode())
        raise NotFoundError(
            f"model {model_id!r} revision {revision!r} is not in the store "
            f"(tiers: {', '.join(t.name for t in self.tiers)}); import it first"
        )

    def tokenizer_file(self, manifest: Manifest, name: str) -> bytes:
        key = manifest.tokenizer_files[name]
        for tier in self.tiers:
            with contextlib.suppress(ObjectNotFoundError):
                data = tier.get(key)
                if blob_key(data) == key:
                    return data
        raise ModelFormatError(
            f"{name} of {manifest.model_id} ({key}) has no good copy in any tier; re-import it"
        )


def copy_model(src: Tier, dst: Tier, model_id: str, revision: str = "main") -> int:
    """Copies a model's manifest, chunks and tokenizer blobs from ``src`` to ``dst``
    (push and pull); objects ``dst`` already holds are skipped. Returns bytes copied.
    The manifest goes last, so ``dst`` never lists a model whose chunks it lacks."""
    key = manifest_key(validate_model_id(model_id), revision)
    if not src.has(key):
        raise NotFoundError(f"{model_id}@{revision} is not in tier {src.name}; nothing to copy")
    manifest_bytes = src.get(key)
    manifest = Manifest.from_json(manifest_bytes.decode())
    copied = 0
    for blob in [c.hash for c in manifest.chunks] + list(manifest.tokenizer_files.values()):
        if not dst.has(blob):
            data = src.get(blob)
            dst.put(blob, data)
            copied += len(data)
    dst.put(key, manifest_bytes)
    return copied + len(manifest_bytes)


def verify_model(store: WeightsStore, model_id: str, revision: str = "main") -> list[str]:
    """Reads every copy of every chunk in every tier; returns the problems found
    (``"tier: chunk: what"``), empty when all copies decode and hash right."""
    from ember_weights_store.codecs import codec_for

    manifest = store.manifest(model_id, revision)
    problems = []
    for chunk in manifest.chunks:
        holders = [t for t in store.tiers if t.has(chunk.hash)]
        if not holders:
            problems.append(f"(no tier): {chunk.hash}: missing everywhere")
        for tier in holders:
            try:
                raw = codec_for(chunk.codec).decode(tier.get(chunk.hash), raw_size=chunk.raw_size)
            except ModelFormatError as exc:
                problems.append(f"{tier.name}: {chunk.hash}: {exc.message}")
                continue
            if blob_key(raw) != chunk.hash:
                problems.append(f"{tier.name}: {chunk.hash}: content does not match its hash")
    return problems
