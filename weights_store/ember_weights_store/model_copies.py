"""A stored model's copies across tiers: copied between object tiers (``ember models push``
and ``pull``: the local bucket, S3) and every copy in every tier checked (``ember models
verify``)."""

from __future__ import annotations

from ember_core import ConfigError, ModelFormatError, NotFoundError
from ember_weights_store.digests import fast_checksum, sha256_key
from ember_weights_store.manifest import Manifest, validate_model_id
from ember_weights_store.store import ProgressFn, WeightsStore, manifest_key
from ember_weights_store.tiers import Tier

__all__ = ["copy_model", "verify_model"]


def copy_model(
    src: Tier,
    dst: Tier,
    model_id: str,
    revision: str = "main",
    *,
    on_progress: ProgressFn | None = None,
) -> int:
    """Copies a model's manifest, chunks and tokenizer blobs from ``src`` to ``dst``
    (push and pull); objects ``dst`` already holds are skipped. Returns bytes copied.
    The manifest goes last, so ``dst`` never lists a model whose chunks it lacks."""
    for tier in (src, dst):
        if tier.holds_decoded:
            raise ConfigError(
                f"tier {tier.name!r} is a cache of decoded chunks; push and pull copy between "
                "object tiers (a local bucket, S3)"
            )
    key = manifest_key(validate_model_id(model_id), revision)
    if not src.has(key):
        raise NotFoundError(f"{model_id}@{revision} is not in tier {src.name}; nothing to copy")
    manifest_bytes = src.get(key)
    manifest = Manifest.from_json(manifest_bytes.decode())
    copied = 0
    total = sum(c.stored_size for c in manifest.chunks)
    done = 0
    for chunk in manifest.chunks:
        if not dst.has(chunk.hash):
            data = src.get(chunk.hash)
            dst.put(chunk.hash, data)
            copied += len(data)
        done += chunk.stored_size
        if on_progress is not None:
            on_progress(done, total)
    for blob in manifest.tokenizer_files.values():
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
                data = tier.get(chunk.hash)
                codec = codec_for("raw" if tier.holds_decoded else chunk.codec)
                raw = codec.decode(data, raw_size=chunk.raw_size)
            except ModelFormatError as exc:
                problems.append(f"{tier.name}: {chunk.hash}: {exc.message}")
                continue
            if sha256_key(raw) != chunk.hash:
                problems.append(f"{tier.name}: {chunk.hash}: content does not match its hash")
            elif chunk.checksum and fast_checksum(raw) != chunk.checksum:
                problems.append(f"{tier.name}: {chunk.hash}: the manifest's checksum is wrong")
    return problems
