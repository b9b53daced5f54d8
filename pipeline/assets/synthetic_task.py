"""Deterministic synthetic GSM8K-format word problems (the tiny task shipped with the repo).

Each row is {"question": ..., "answer": ...}; the answer is a short worked solution ending in
"#### <non-negative integer>", e.g.

    question: "Mia has 7 apples. She buys 5 more and gives 3 to Leo. How many apples does Mia have now?"
    answer:   "Mia starts with 7 apples. 7 + 5 = 12. 12 - 3 = 9. #### 9"

Several problem kinds (one or two arithmetic steps over small integers) keep it a real, if easy, task.
Generation uses Python's ``random.Random`` (Mersenne Twister, identical on every platform), so the same seed gives
the same rows byte for byte. Splits are disjoint by question text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

NAMES_AND_PRONOUNS = [
    ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Tom", "He"),
    ("Lily", "She"), ("Ben", "He"), ("Emma", "She"), ("Max", "He"), ("Nora", "She"), ("Jack", "He"),
    ("Ella", "She"), ("Omar", "He"), ("Ruby", "She"), ("Ivan", "He"),
]
OBJECTS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "coins", "cards", "flowers",
    "stamps", "candies", "toys", "eggs", "balloons", "crayons",
]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets", "trays"]

SPLIT_SIZES = {"train": 3000, "validation": 200, "test": 200}
DEFAULT_SEED = 1234

Row = dict[str, str]


def _two_people(rng: random.Random) -> tuple[str, str, str]:
    (name, pronoun), (other, _) = rng.sample(NAMES_AND_PRONOUNS, 2)
    return name, pronoun, other


def _buy_then_give(rng: random.Random) -> Row:
    name, pronoun, other = _two_people(rng)
    thing = rng.choice(OBJECTS)
    start, bought = rng.randint(2, 15), rng.randint(2, 15)
    given = rng.randint(1, start + bought)
    total = start + bought
    return {
        "question": f"{name} has {start} {thing}. {pronoun} buys {bought} more and gives {given} to {other}. "
        f"How many {thing} does {name} have now?",
        "answer": f"{name} starts with {start} {thing}. {start} + {bought} = {total}. "
        f"{total} - {given} = {total - given}. #### {total - given}",
    }


def _receive(rng: random.Random) -> Row:
    name, _, other = _two_people(rng)
    thing = rng.choice(OBJECTS)
    start, received = rng.randint(2, 20), rng.randint(2, 20)
    return {
        "question": f"{name} has {start} {thing}. {other} gives {name} {received} more {thing}. "
        f"How many {thing} does {name} have?",
        "answer": f"{name} has {start} {thing} and gets {received} more. {start} + {received} = {start + received}. "
        f"#### {start + received}",
    }


def _lose(rng: random.Random) -> Row:
    name, pronoun, _ = _two_people(rng)
    thing = rng.choice(OBJECTS)
    start = rng.randint(5, 30)
    lost = rng.randint(1, start)
    return {
        "question": f"{name} had {start} {thing}. {pronoun} lost {lost} of them. How many {thing} are left?",
        "answer": f"{name} had {start} {thing} and lost {lost}. {start} - {lost} = {start - lost}. "
        f"#### {start - lost}",
    }


def _containers(rng: random.Random) -> Row:
    name, _, _ = _two_people(rng)
    thing, container = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    count, each = rng.randint(2, 9), rng.randint(2, 9)
    return {
        "question": f"{name} buys {count} {container} of {thing}. Each of the {container} holds {each} {thing}. "
        f"How many {thing} does {name} buy?",
        "answer": f"There are {count} {container} with {each} {thing} each. {count} * {each} = {count * each}. "
        f"#### {count * each}",
    }


def _containers_then_give(rng: random.Random) -> Row:
    name, pronoun, other = _two_people(rng)
    thing, container = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    count, each = rng.randint(2, 6), rng.randint(2, 6)
    total = count * each
    given = rng.randint(1, total)
    return {
        "question": f"{name} has {count} {container} with {each} {thing} in each. {pronoun} gives {given} {thing} "
        f"to {other}. How many {thing} does {name} keep?",
        "answer": f"{name} has {count} * {each} = {total} {thing}. {total} - {given} = {total - given}. "
        f"#### {total - given}",
    }


def _together(rng: random.Random) -> Row:
    name, _, other = _two_people(rng)
    thing = rng.choice(OBJECTS)
    first, more = rng.randint(2, 12), rng.randint(1, 9)
    second = first + more
    return {
        "question": f"{name} has {first} {thing}. {other} has {more} more {thing} than {name}. "
        f"How many {thing} do they have together?",
        "answer": f"{other} has {first} + {more} = {second} {thing}. Together they have {first} + {second} = "
        f"{first + second}. #### {first + second}",
    }


def _share(rng: random.Random) -> Row:
    name, pronoun, _ = _two_people(rng)
    thing = rng.choice(OBJECTS)
    friends, each = rng.randint(2, 6), rng.randint(2, 9)
    total = friends * each
    return {
        "question": f"{name} has {total} {thing}. {pronoun} shares them equally among {friends} friends. "
        f"How many {thing} does each friend get?",
        "answer": f"{name} splits {total} {thing} into {friends} equal parts. {total} / {friends} = {each}. "
        f"#### {each}",
    }


PROBLEM_KINDS: list[Callable[[random.Random], Row]] = [
    _buy_then_give, _receive, _lose, _containers, _containers_then_give, _together, _share,
]


def generate_rows(count: int, seed: int = DEFAULT_SEED) -> list[Row]:
    """``count`` distinct rows (unique questions), kinds drawn uniformly, deterministic in ``seed``."""
    rng = random.Random(seed)
    rows: list[Row] = []
    seen_questions: set[str] = set()
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 50 * count:
            raise RuntimeError(f"could not draw {count} distinct problems in {attempts} attempts; lower the count")
        row = rng.choice(PROBLEM_KINDS)(rng)
        if row["question"] not in seen_questions:
            seen_questions.add(row["question"])
            rows.append(row)
    return rows


def generate_splits(seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[Row]]:
    """Disjoint splits carved in order (test, validation, train) from one stream of distinct problems."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    ordered_names = [name for name in ("test", "validation", "train") if name in sizes]
    ordered_names += [name for name in sizes if name not in ordered_names]
    rows = generate_rows(sum(sizes.values()), seed)
    splits: dict[str, list[Row]] = {}
    start = 0
    for name in ordered_names:
        splits[name] = rows[start : start + sizes[name]]
        start += sizes[name]
    return splits


def write_jsonl(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_splits(splits: dict[str, list[Row]], directory: Path) -> None:
    """``directory/<split>.jsonl`` for every split."""
    for name, rows in splits.items():
        write_jsonl(rows, directory / f"{name}.jsonl")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}); fix or regenerate the file")
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{line_number}: row needs 'question' and 'answer' keys")
            rows.append(row)
    return rows
