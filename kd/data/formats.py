"""Reading rows of every data format into one format-independent :class:`Record` (the only sample reader).

``data.format`` (one value per source):

* ``gsm8k``     — ``{"question", "answer"}`` whose answer ends in ``#### N``: a question/answer record (one
  exchange), built with the question/answer prompt of :mod:`kd.data.prompting`.
* ``alpaca``    — ``{"instruction", "input" (optional), "output", "system" (optional)}``: the user turn is the
  instruction, followed by a blank line and the input when the input is non-empty; the assistant turn is
  the output.
* ``sharegpt``  — ``{"conversations": [{"from", "value"}, ...], "system" (optional)}``; ``from`` is one of
  human/user, gpt/assistant/model, system.
* ``openai``    — ``{"messages": [{"role", "content"}, ...]}``; roles system/developer, user, assistant;
  content is a string or a list of ``{"type": "text", "text"}`` parts. Qwen ChatML data exported as
  messages is this format.
* ``text``      — ``{"text"}``: a document; every token is distilled.
* ``tokenized`` — ``{"input_ids": [int], "loss_mask": [0/1] (optional) | "labels": [int] (optional)}``
  (parquet or JSONL): ids distilled where the mask is 1 / the label is not -100 (labels are unshifted, HF
  convention: ``labels[p] == input_ids[p]``), every id when neither is given.
* ``auto``      — detected from the keys of the first row and reported; an explicit format always wins.

Conversations are checked: no empty conversation, known roles only, a system message only first, string
content, at least one non-empty assistant turn. Every problem names ``file:line`` (parquet: ``file:row N``)
and follows ``data.on_error``: ``fail`` raises :class:`kd.errors.DataError` at the first bad row, ``skip``
skips it and reports it in :attr:`RecordSet.skipped`. Sample ids are the row's ``id`` or ``<file stem>:<line>``
and must be unique (they key the cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kd.data.rows import iter_rows
from kd.errors import DataError

CHAT_FORMATS = ("alpaca", "sharegpt", "openai")
DOCUMENT_FORMATS = ("text", "tokenized")
"""Formats without a question/answer structure: every (unmasked) token is distilled, no shots."""
DATA_FORMATS = ("gsm8k", *CHAT_FORMATS, *DOCUMENT_FORMATS, "auto")
"""``data.format`` and ``data.mixture[i].format``."""
ON_ERROR_POLICIES = ("fail", "skip")
"""``data.on_error``: stop at the first malformed row, or skip and count it."""

# GSM8K convention: the worked solution ends in "#### <number>" (commas are thousands separators).
FINAL_ANSWER_MARK = re.compile(r"####\s*-?[\d,.]*\d")

# The keys that identify a format in `auto` detection, most specific first.
_SIGNATURES = (
    ("tokenized", ("input_ids",)),
    ("openai", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("gsm8k", ("question", "answer")),
    ("text", ("text",)),
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    """One training row in a format-independent shape.

    Exactly one of ``messages`` (role, content) pairs (chat, and the one exchange of a question/answer row),
    ``text`` (document) or ``token_ids`` (with ``loss_mask``) is set.
    """

    sample_id: str
    row_index: int
    location: str
    messages: tuple[tuple[str, str], ...] | None = None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    loss_mask: tuple[bool, ...] | None = None
    question_answer: bool = False
    """A GSM8K-format row: its messages are (user question, assistant answer), prompted as question/answer."""

    @property
    def kind(self) -> str:
        """``qa``, ``chat``, ``text`` or ``tokens``: which sequence builder turns it into tokens."""
        if self.messages is not None:
            return "qa" if self.question_answer else "chat"
        return "text" if self.text is not None else "tokens"

    def exchange(self) -> tuple[str, str] | None:
        """(user, assistant) when the conversation is a single exchange (usable as a few-shot example)."""
        turns = [m for m in self.messages or () if m[0] != "system"]
        if len(turns) == 2 and turns[0][0] == "user" and turns[1][0] == "assistant":
            return turns[0][1], turns[1][1]
        return None


@dataclass
class RecordSet:
    """Records read from one source, the format used, and rows skipped under ``on_error="skip"``."""

    source: str
    format: str
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def detect_format(row: object, location: str) -> str:
    """The format whose signature keys the row has, or DataError naming the row and its keys."""
    if isinstance(row, dict):
        for name, keys in _SIGNATURES:
            if all(key in row for key in keys):
                return name
        found = sorted(row)[:8]
    else:
        found = type(row).__name__
    raise DataError(f"{location}: cannot detect data.format from the row's keys {found}; set data.format to one "
                    f"of {', '.join(f for f in DATA_FORMATS if f != 'auto')}")


def _text_content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _check_conversation(messages: list[tuple[str, str]]) -> None:
    if not messages:
        raise ValueError("empty conversation")
    for turn, (role, _) in enumerate(messages):
        if role == "system" and turn != 0:
            raise ValueError(f"system message at turn {turn + 1}; only the first message may be a system message")
    assistants = [content for role, content in messages if role == "assistant"]
    if not assistants:
        raise ValueError("conversation has no assistant turn (nothing to distil)")
    for turn, (role, content) in enumerate(messages):
        if role == "assistant" and not content.strip():
            raise ValueError(f"empty assistant message at turn {turn + 1}")


def _turns(raw: object, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise ValueError(f"'{key}' must be a list of turns, got {type(raw).__name__}")
    messages = []
    for turn, item in enumerate(raw, start=1):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ValueError(f"{key}[{turn}] must be an object with '{role_key}' and '{content_key}'")
        role = item[role_key]
        if role not in roles:
            raise ValueError(f"{key}[{turn}]: unknown role {role!r} (expected one of {', '.join(sorted(roles))})")
        messages.append((roles[role], _text_content(item[content_key], f"{key}[{turn}]")))
    return messages


def _require(row: dict, keys: tuple[str, ...], fmt: str) -> None:
    missing = [key for key in keys if key not in row or row[key] is None]
    if missing:
        article = "an" if fmt[0] in "aeiou" else "a"
        raise ValueError(f"not {article} {fmt} row: missing {', '.join(repr(k) for k in missing)} (row keys "
                         f"{sorted(row)[:8]}); mixed schemas? set data.format or fix the row")


def _optional_system(row: dict) -> list[tuple[str, str]]:
    system = row.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    return [("system", system)]


def _parse_chat(row: dict, fmt: str) -> list[tuple[str, str]]:
    if fmt == "alpaca":
        _require(row, ("instruction", "output"), fmt)
        for key in ("instruction", "input", "output"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"field '{key}' must be a string, got {type(row[key]).__name__}")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = _optional_system(row) + [("user", user), ("assistant", row["output"])]
    elif fmt == "sharegpt":
        _require(row, ("conversations",), fmt)
        messages = _optional_system(row) + _turns(row["conversations"], "conversations", "from", "value",
                                                  _SHAREGPT_ROLES)
    else:
        _require(row, ("messages",), fmt)
        messages = _turns(row["messages"], "messages", "role", "content", _OPENAI_ROLES)
    _check_conversation(messages)
    return messages


def _parse_tokens(row: dict) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    _require(row, ("input_ids",), "tokenized")
    ids = row["input_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("'input_ids' must be a non-empty list of integers")
    if row.get("loss_mask") is not None and row.get("labels") is not None:
        raise ValueError("give 'loss_mask' or 'labels', not both")
    if row.get("loss_mask") is not None:
        mask = row["loss_mask"]
        if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
            raise ValueError(f"'loss_mask' must be a list of {len(ids)} zeros and ones (one per input id)")
        return tuple(ids), tuple(bool(m) for m in mask)
    if row.get("labels") is not None:
        labels = row["labels"]
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise ValueError(f"'labels' must be a list of {len(ids)} ids (one per input id, -100 = not distilled)")
        for p, (label, token) in enumerate(zip(labels, ids)):
            if label != -100 and label != token:
                raise ValueError(f"labels[{p}]={label} differs from input_ids[{p}]={token}: labels must be unshifted "
                                 "copies of input_ids with -100 where nothing is distilled")
        return tuple(ids), tuple(label != -100 for label in labels)
    return tuple(ids), tuple(True for _ in ids)


def _question_answer_problem(row: dict) -> str | None:
    """Why a row is not a usable GSM8K sample, or None when it is."""
    for key in ("question", "answer"):
        if key not in row or row[key] is None:
            return f"missing field '{key}'"
        if not isinstance(row[key], str):
            return f"field '{key}' must be a string, got {type(row[key]).__name__}"
    if not row["question"].strip():
        return "empty question"
    if not row["answer"].strip():
        return "empty answer"
    if not FINAL_ANSWER_MARK.search(row["answer"]):
        return "answer has no final '#### <number>' line"
    return None


def parse_row(row: object, fmt: str, sample_id: str, row_index: int, location: str) -> Record:
    """A Record from one parsed row of format ``fmt``; ValueError (the problem, no location) when unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "gsm8k":
        problem = _question_answer_problem(row)
        if problem is not None:
            raise ValueError(problem)
        return Record(sample_id, row_index, location, messages=(("user", row["question"]),
                                                                ("assistant", row["answer"])), question_answer=True)
    if fmt in CHAT_FORMATS:
        return Record(sample_id, row_index, location, messages=tuple(_parse_chat(row, fmt)))
    if fmt == "text":
        _require(row, ("text",), fmt)
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return Record(sample_id, row_index, location, text=row["text"])
    ids, mask = _parse_tokens(row)
    return Record(sample_id, row_index, location, token_ids=ids, loss_mask=mask)


def resolve_format(spec: str, fmt: str, dataset_config: str | None = None) -> str:
    """``fmt`` itself, or for ``auto`` the format detected from the first row of ``spec``."""
    if fmt != "auto":
        return fmt
    _, rows = iter_rows(spec, dataset_config)
    for _, location, row in rows:
        if isinstance(row, json.JSONDecodeError):
            raise DataError(f"{location}: malformed JSON ({row.msg} at column {row.colno}); cannot detect "
                            "data.format")
        return detect_format(row, location)
    raise DataError(f"{spec}: no rows; cannot detect data.format")


def read_records(spec: str, fmt: str, *, dataset_config: str | None = None, on_error: str = "fail",
                 max_samples: int | None = None) -> RecordSet:
    """Read and check every row of ``spec`` as format ``fmt`` (``auto``: detected from the first row)."""
    fmt = resolve_format(spec, fmt, dataset_config)
    stem, rows = iter_rows(spec, dataset_config)
    result = RecordSet(spec, fmt)
    first_location: dict[str, str] = {}
    for row_index, location, row in rows:
        if max_samples is not None and len(result.records) >= max_samples:
            break
        line_tag = location.rsplit(":", 1)[-1].replace("row ", "")
        row_id = row.get("id") if isinstance(row, dict) else None
        sample_id = str(row_id) if row_id is not None else f"{stem}:{line_tag}"
        try:
            if isinstance(row, json.JSONDecodeError):
                raise ValueError(f"malformed JSON ({row.msg} at column {row.colno})")
            record = parse_row(row, fmt, sample_id, row_index, location)
        except ValueError as problem:
            if on_error != "skip":
                raise DataError(f"{location}: {problem}; fix the row or set data.on_error=skip") from None
            result.skipped.append(f"{location}: {problem}")
            continue
        if sample_id in first_location:
            raise DataError(f"{location}: duplicate sample id {sample_id!r} (first at {first_location[sample_id]})")
        first_location[sample_id] = location
        result.records.append(record)
    if not result.records:
        raise DataError(f"{spec}: no usable samples ({fmt} rows)" + (f", {len(result.skipped)} skipped"
                                                                     if result.skipped else ""))
    return result


def source_name(spec: str) -> str:
    """A short source name for a single-source run: the file stem, or the dataset spec."""
    path = Path(spec)
    return path.stem if path.suffix else spec
