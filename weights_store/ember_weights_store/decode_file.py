"""A tokenizer's decode-only copy: ``tokenizer.json`` without its BPE merges.

Decoding maps ids to vocabulary entries and runs the decoder; only encoding needs the
merges, and parsing them is half of ``tokenizers.Tokenizer.from_file``'s time (SmolLM2:
48,900 merges, ~38 ms of ~75 ms), time a worker's cold start spends on its critical path
holding the GIL. A worker is given prompts as ids by its router, so it parses this copy
to serve and the whole file only when it first encodes (the chat preamble, once idle):
``Tokenizer.from_dir(decode_first=True)`` in ``ember_functions``.

Made once, when a model is imported: the store keeps it as one more tokenizer file
(``DECODE_FILE``), and every worker's tokenizer directory gets it with the others.
"""

from __future__ import annotations

import json

__all__ = ["DECODE_FILE", "decode_only"]

DECODE_FILE = "tokenizer.decode.json"


def decode_only(tokenizer_json: bytes) -> bytes | None:
    """``tokenizer_json`` with its BPE merges dropped, or None when there is nothing to
    drop (not BPE, no merges, or not a JSON object: the full file reports its own errors
    where it is parsed)."""
    try:
        data = json.loads(tokenizer_json)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("merges"):
        return None
    data["model"] = {**model, "merges": []}
    return json.dumps(data, ensure_ascii=False).encode()
