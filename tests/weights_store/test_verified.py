"""``VerifiedCopies``: which files were checked for a chunk, so a loader skips exactly those."""

from __future__ import annotations

import os
from pathlib import Path

from ember_weights_store.verified import FileIdentity, VerifiedCopies


def _checked(path: Path, data: bytes) -> FileIdentity:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileIdentity.of(os.stat(path))


def test_copies_of_one_chunk_in_two_tiers_are_both_covered(tmp_path: Path) -> None:
    # A zygote prepared for two pools of one model, each with its own host tier.
    first, second = tmp_path / "pool-a" / "k", tmp_path / "pool-b" / "k"
    a, b = VerifiedCopies(), VerifiedCopies()
    a.add("k", _checked(first, b"chunk"))
    b.add("k", _checked(second, b"chunk"))
    a.update(b)
    assert a.covers("k", first) and a.covers("k", second)  # the later check kept the first
    assert len(a) == 2
    again = VerifiedCopies.from_dict(a.as_dict())  # as a readahead child hands them over
    assert again.covers("k", first) and again.covers("k", second)


def test_a_file_written_again_at_the_path_is_not_covered(tmp_path: Path) -> None:
    path = tmp_path / "k"
    copies = VerifiedCopies()
    copies.add("k", _checked(path, b"chunk"))
    replacement = tmp_path / "k.new"
    replacement.write_bytes(b"other")
    os.replace(replacement, path)  # how a cache tier replaces a chunk: a new file
    assert not copies.covers("k", path)
    assert not copies.covers("other-key", path)
    assert not copies.covers("k", tmp_path / "missing")
