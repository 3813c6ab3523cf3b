"""A model's tokenizer as a directory on this machine, named by its content: the files the
manifest lists (fetched from the store's tiers) and the architecture as ``config.json``.

Written once per content and never changed, so any number of processes share one, and a
worker's readahead child can write it before the worker looks (an empty home's first
start from S3). Imports no torch: the readahead runs while torch imports.

Example::

    path = tokenizer_dir(store, store.manifest("acme/tiny"), home / "tokenizers")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ember_weights_store.decode_file import DECODE_FILE
from ember_weights_store.decode_table import DECODE_TABLE_FILE, build_decode_table

if TYPE_CHECKING:
    from ember_weights_store.manifest import Manifest
    from ember_weights_store.store import WeightsStore

__all__ = ["tokenizer_dir", "tokenizer_dir_name"]


def tokenizer_dir_name(files: Mapping[str, str]) -> str:
    """The directory name for tokenizer files (name -> content key): same files, same name."""
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return digest[:32]


def tokenizer_dir(store: WeightsStore, manifest: Manifest, cache: Path) -> Path:
    """``manifest``'s tokenizer under ``cache``, written there first if it is not yet: into
    a temporary directory, then renamed into place, so a reader never sees half of it.
    A byte-level tokenizer's decode table (``decode_table.py``) is added to a directory
    written before there were tables."""
    final = cache / tokenizer_dir_name(manifest.tokenizer_files)
    if final.is_dir():
        _add_decode_table(final)
        return final
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        for name in manifest.tokenizer_files:
            (tmp / name).write_bytes(store.tokenizer_file(manifest, name))
        (tmp / "config.json").write_text(json.dumps(manifest.architecture))
        _add_decode_table(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not another process's copy, renamed first: a failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


def _add_decode_table(directory: Path) -> None:
    """Writes the decode table beside the decode-only copy, where there is one (~40 ms of
    Python for 49k tokens, once per directory). Where the decoding is not byte-level the
    file is written empty, so the next worker's start does not parse the copy again to
    find that out (a ``DecodeTable`` refuses an empty file: the tokenizer is parsed)."""
    table_path, source = directory / DECODE_TABLE_FILE, directory / DECODE_FILE
    if table_path.exists() or not source.is_file():
        return
    tmp = directory / f".{DECODE_TABLE_FILE}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(build_decode_table(source.read_bytes()) or b"")
        os.replace(tmp, table_path)  # whole or not at all; a second writer wrote the same
    except OSError:
        pass  # a directory we may not write: the tokenizer is parsed instead
    finally:
        tmp.unlink(missing_ok=True)
