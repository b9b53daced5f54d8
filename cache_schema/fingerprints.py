"""Stable content fingerprints recorded in a cache's metadata and compared on resume.

All fingerprints are the first FINGERPRINT_LENGTH hex digits of a sha256 over a canonical byte encoding, so
they are identical across processes, machines and Python versions for identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FINGERPRINT_LENGTH = 16
_READ_BLOCK = 1 << 20


def _short(digest: "hashlib._Hash") -> str:
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def _to_jsonable(value: Any) -> Any:
    """json.dumps `default` hook: numpy scalars/arrays, paths, sets and tuples-as-keys made canonical."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r:.80}")


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys; NaN/inf refused because they have no canonical JSON form."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_to_jsonable
    )


def json_fingerprint(obj: Any) -> str:
    """Fingerprint of a JSON-able object (dict key order does not matter, list order does)."""
    return _short(hashlib.sha256(canonical_json(obj).encode("utf-8")))


def _hash_file_into(digest: "hashlib._Hash", path: Path) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a file, or of a directory tree (sorted relative paths + sizes + bytes).

    Names matter inside a directory (a renamed file changes the fingerprint); the directory's own name and
    file timestamps do not. Symlinks are followed.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: no such file or directory")
    digest = hashlib.sha256()
    if root.is_file():
        _hash_file_into(digest, root)
        return _short(digest)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file_path in files:
        relative = file_path.relative_to(root).as_posix()
        # Length-prefixing name and size keeps ("ab","c") and ("a","bc") from hashing alike.
        digest.update(f"{len(relative)}:{relative}:{file_path.stat().st_size}:".encode("utf-8"))
        _hash_file_into(digest, file_path)
    return _short(digest)


def samples_fingerprint(samples: Iterable[Mapping[str, Any]]) -> str:
    """Fingerprint of an ordered stream of sample dicts (order matters: it decides part membership)."""
    digest = hashlib.sha256()
    count = 0
    for sample in samples:
        digest.update(canonical_json(dict(sample)).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    digest.update(f"count={count}".encode("utf-8"))
    return _short(digest)


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """Named special tokens (bos/eos/pad/...) plus every added token flagged special, with ids."""
    named = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    flagged = {str(token_id): str(token) for token_id, token in added.items() if getattr(token, "special", True)}
    return {
        "named": {k: str(v) if not isinstance(v, list) else [str(x) for x in v] for k, v in named.items()},
        "added_special": flagged,
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of a tokenizer's real vocabulary, its special tokens and its chat template.

    Uses the token->id map (`get_vocab()`, added tokens included), not a model's `vocab_size`: models sharing
    one tokenizer may pad their embedding matrices differently (Qwen2.5 3B: 151936 rows, 7B: 152064).
    Accepts a transformers tokenizer or a raw `tokenizers.Tokenizer`. Merges/normalizers are not hashed: a
    tokenizer whose vocabulary and specials are unchanged is treated as the same tokenizer.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(f"tokenizer_fingerprint needs an object with get_vocab(), got {type(tokenizer).__name__}")
    try:
        vocab = get_vocab(with_added_tokens=True)
    except TypeError:  # transformers tokenizers take no argument and always include added tokens
        vocab = get_vocab()
    payload = {
        "vocab": sorted((str(token), int(token_id)) for token, token_id in vocab.items()),
        "special": _special_tokens(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return json_fingerprint(payload)
