"""Object keys and where they live: one validation, one key <-> relative path mapping.

Keys are content hashes (``sha256:<hex>``) or object paths (``manifests/org--name/rev.json``).
Every tier maps a key to the same relative path, so a local bucket, a disk cache and an S3
prefix share one layout.
"""

from __future__ import annotations

import re

from ember_core import InvalidRequestError

_KEY_CHARS = re.compile(r"[A-Za-z0-9._:/-]+")
# Lowercase hex only: one canonical spelling per hash, so one path per chunk.
_HASH_KEY = re.compile(r"(?P<algo>[a-z][a-z0-9]{0,15}):(?P<hex>[0-9a-f]{16,128})")
_MAX_KEY_LEN = 1024  # S3's limit on object names
_MAX_SEGMENT_LEN = 255  # common filesystem limit on one name
_CHUNKS = "chunks"


def validate_key(key: str) -> str:
    """Returns ``key`` if it is a safe object key, else raises ``InvalidRequestError``."""
    problem = _key_problem(key)
    if problem:
        raise InvalidRequestError(f"object key {key!r} {problem}", param="key")
    return key


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "is empty; pass 'sha256:<hex>' or a relative path"
    if len(key) > _MAX_KEY_LEN:
        return f"is {len(key)} characters; keep keys under {_MAX_KEY_LEN}"
    if "\\" in key or "\x00" in key:
        return "contains a backslash or NUL; use '/' to separate segments"
    if not _KEY_CHARS.fullmatch(key):
        return "has characters outside [A-Za-z0-9._:/-]; rename it"
    if ":" in key:
        if _HASH_KEY.fullmatch(key):
            return None
        return (
            "contains ':' but is not a content hash; content hashes are "
            "'<algo>:<lowercase hex>' (e.g. 'sha256:...'), paths may not contain ':'"
        )
    if key.startswith("/"):
        return "is absolute; keys are relative paths"
    for segment in key.split("/"):
        # Covers '..', '.', empty segments (a//b, trailing '/') and our own temp names.
        if not segment or segment.startswith("."):
            return (
                "has an empty segment or one starting with '.'; "
                "use plain names such as 'manifests/org--name/rev.json'"
            )
        if len(segment) > _MAX_SEGMENT_LEN:
            return f"has a segment over {_MAX_SEGMENT_LEN} characters; shorten it"
    if key.split("/", 1)[0] == _CHUNKS:
        # Reserved so that key -> path stays one-to-one with content-hash keys.
        return f"starts with the reserved '{_CHUNKS}/' prefix; store chunks as 'sha256:<hex>'"
    return None


def key_to_path(key: str) -> str:
    """The object's relative POSIX path: ``sha256:abcd..`` -> ``chunks/sha256/ab/abcd..``."""
    validate_key(key)
    m = _HASH_KEY.fullmatch(key)
    if m:
        digest = m["hex"]
        # A two-hex-digit fan-out keeps directories small with millions of chunks.
        return f"{_CHUNKS}/{m['algo']}/{digest[:2]}/{digest}"
    return key


def path_to_key(relpath: str) -> str | None:
    """The key stored at ``relpath``, or ``None`` if no key maps to that path."""
    parts = relpath.split("/")
    if parts[0] == _CHUNKS:
        if len(parts) != 4 or parts[3][:2] != parts[2]:
            return None
        key = f"{parts[1]}:{parts[3]}"
        return key if _HASH_KEY.fullmatch(key) else None
    return None if _key_problem(relpath) else relpath
