"""The synthetic task (pipeline.assets.synthetic_task, same generator and seed) rewritten for Qwen's vocabulary.

With plain English text almost every Qwen token id is below 65,536 (Qwen's first 100k ranks are cl100k's
English/code tokens), so ids that need more than 16 bits would never be scored. The rewrite keeps every
problem and its arithmetic and changes only surface forms, each to a form whose Qwen token id is > 65,535:

* names and objects: the same gender and role, words whose space-prefixed form is one Qwen token with a high
  rank (" Leah" 66861, " bananas" 67342, ... ; checked by the builder and the tests against the ranks);
* the operators: full-width "＋" (140157), "－" (89481), "＝" (133972) and "÷" (144422), written without
  spaces as in CJK math text ("7＋5＝12"), so each stays its own pre-token; "*" becomes "×" (17568).

The ``#### N`` answer mark and the ASCII digits (ids 15-24) are unchanged, so answer extraction and exact
match work as for the tiny task.
"""

from __future__ import annotations

import re

from pipeline.assets.synthetic_task import CONTAINERS, NAMES_AND_PRONOUNS, OBJECTS, Row, generate_splits

# Same order as synthetic_task's lists: the k-th name keeps the k-th name's pronoun.
HIGH_ID_NAMES = ("Leah", "Homer", "Vera", "Nigel", "Cindy", "Otto", "Tiffany", "Basil", "Elena", "Elliot",
                 "Regina", "Julius", "Deborah", "Maurice", "Katrina", "Dominic")
HIGH_ID_OBJECTS = ("bananas", "magnets", "earrings", "pellets", "pancakes", "notebooks", "pillows", "cushions",
                   "sneakers", "kittens", "sandals", "desserts", "bicycles", "rabbits", "balloons", "scissors")
HIGH_ID_CONTAINERS = ("crates", "cages", "chests", "racks", "baskets", "trays")
# " a + b" -> "a＋b": the spaces go too, else " ＋" would be split into " " and a byte-level piece.
OPERATORS = {"+": "\uff0b", "-": "\uff0d", "=": "\uff1d", "*": "\u00d7", "/": "\u00f7"}

WORD_MAP = {
    **{name: new for (name, _), new in zip(NAMES_AND_PRONOUNS, HIGH_ID_NAMES, strict=True)},
    **dict(zip(OBJECTS, HIGH_ID_OBJECTS, strict=True)),
    **dict(zip(CONTAINERS, HIGH_ID_CONTAINERS, strict=True)),
}
_WORD = re.compile(r"\b(" + "|".join(sorted(WORD_MAP, key=len, reverse=True)) + r")\b")
_OPERATOR = re.compile(r" ([+\-=*/]) ")


def rewrite_text(text: str) -> str:
    """One question or answer with the high-id surface forms."""
    text = _WORD.sub(lambda match: WORD_MAP[match.group(1)], text)
    return _OPERATOR.sub(lambda match: OPERATORS[match.group(1)], text)


def rewrite_row(row: Row) -> Row:
    return {key: rewrite_text(value) for key, value in row.items()}


def generate_scale_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[Row]]:
    """The tiny generator's splits (same seed: the same problems), rewritten."""
    return {name: [rewrite_row(row) for row in rows] for name, rows in generate_splits(seed, sizes).items()}


def high_id_words() -> list[str]:
    """Every word the rewrite introduces, space-prefixed as it appears mid-sentence (for rank checks)."""
    return [" " + word for word in WORD_MAP.values()] + list(OPERATORS.values())
