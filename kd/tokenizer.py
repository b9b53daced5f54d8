"""Loading a model's tokenizer (one loader for teacher, student and evaluation) and the one pad-id rule."""

from __future__ import annotations

import os

from kd.errors import UserError


def _looks_like_a_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything absolute, relative or deeper is meant as a local path."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def load_tokenizer(model: str, key: str = "student.model"):
    """``AutoTokenizer.from_pretrained(model)``, or a one-line UserError naming the config ``key``."""
    from transformers import AutoTokenizer

    if _looks_like_a_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise UserError(f"{key}={model!r}: not found (no such directory); check the path")
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}={model!r}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos, else 0.

    Padded positions are always masked out (attention mask, distilled positions), so the choice only has to be a
    valid id; taking eos when there is no pad token follows transformers' own generate() convention.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
