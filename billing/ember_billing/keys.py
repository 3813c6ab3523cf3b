"""API keys: ``ek_<prefix>_<secret>``.

The prefix (8 hex chars) is public: it finds the key's row and is what lists show.
The secret (32 random bytes) is shown once, at creation; only ``sha256(salt ||
secret)`` is stored. A slow hash (scrypt) protects low-entropy passwords; a 256-bit
random secret needs none, and a fast hash keeps authentication off the request's
critical path. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ember_core.errors import AuthenticationError

KEY_PREFIX = "ek"
_PREFIX_CHARS = 8


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly made key: ``plaintext`` goes to the user once and is never stored."""

    plaintext: str
    prefix: str
    salt: str
    secret_hash: str


def hash_secret(secret: str, salt: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def generate_key() -> NewKey:
    prefix = secrets.token_hex(_PREFIX_CHARS // 2)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return NewKey(
        plaintext=f"{KEY_PREFIX}_{prefix}_{secret}",
        prefix=prefix,
        salt=salt,
        secret_hash=hash_secret(secret, salt),
    )


def split_key(plaintext: object) -> tuple[str, str]:
    """``(prefix, secret)`` of a presented key, or AuthenticationError."""
    if not isinstance(plaintext, str):
        raise AuthenticationError("no API key given; send `Authorization: Bearer ek_...`")
    parts = plaintext.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != _PREFIX_CHARS or not parts[2]:
        raise AuthenticationError(
            "malformed API key: Ember keys look like ek_<8 chars>_<secret>; "
            "copy the whole key printed by `ember keys create`"
        )
    return parts[1], parts[2]


def secret_matches(secret: str, *, salt: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, salt), secret_hash)
