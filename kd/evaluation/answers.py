"""Final answers from generated GSM8K-style solutions, for exact-match scoring.

Rules, in order:

1. **``####`` mark** — the number after the *first* ``####`` (regex ``####\\s*(-?[\\d,]*\\.?\\d+)``; commas are
   thousands separators and are removed). The first mark wins because a solution ends at its mark: text a
   model keeps generating after it (a new "question", another ``####``) is not part of its answer.
2. **Last number** (``fallback="last_number"``, the default) — when there is no ``####`` mark, the last number
   anywhere in the text (lm-evaluation-harness calls this "flexible extract"). Reported separately, so a
   model that never writes the mark shows up as such rather than silently.
3. Otherwise no answer (counted as wrong, and as "no extractable answer").

Numbers are compared as exact decimals: ``1,000`` equals ``1000`` and ``12.50`` equals ``12.5``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MARKED_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_FALLBACKS = ("last_number", "none")
"""``eval.answer_fallback``: with no ``####`` mark, take the last number (reported apart), or count no answer."""


@dataclass(frozen=True)
class Extraction:
    """What was read from one text."""

    value: str | None
    """The answer as a normalized decimal string (``"-1200"``, ``"2.5"``), or None when nothing was found."""
    method: str
    """``mark`` (after ``####``), ``last_number`` (fallback) or ``none``."""


def normalize_number(text: str) -> str | None:
    """``"1,200.50"`` → ``"1200.5"``; None for text that is not a number once commas are removed."""
    cleaned = text.replace(",", "").strip()
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def extract_answer(text: str, fallback: str = "last_number") -> Extraction:
    """The final answer of a generated solution by the rules in the module docstring."""
    if fallback not in ANSWER_FALLBACKS:
        raise ValueError(f"fallback must be one of {ANSWER_FALLBACKS}, got {fallback!r}")
    marked = MARKED_ANSWER.search(text)
    if marked is not None:
        value = normalize_number(marked.group(1))
        if value is not None:
            return Extraction(value, "mark")
    if fallback == "last_number":
        numbers = ANY_NUMBER.findall(text)
        for candidate in reversed(numbers):
            value = normalize_number(candidate)
            if value is not None:
                return Extraction(value, "last_number")
    return Extraction(None, "none")


def reference_answer(answer: str) -> str:
    """The gold answer of a reference solution: the number after its ``####`` (no fallback)."""
    found = extract_answer(answer, fallback="none")
    if found.value is None:
        raise ValueError(f"reference answer has no '#### <number>' mark: {answer[-80:]!r}")
    return found.value


def is_correct(prediction: Extraction, gold: str) -> bool:
    """Exact match of normalized numbers; a missing prediction is wrong."""
    return prediction.value is not None and prediction.value == gold
