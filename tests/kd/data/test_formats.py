"""Reading alpaca / sharegpt / openai / text / tokenized rows: what each becomes, auto detection, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.data.formats import read_records, resolve_format
from kd.errors import DataError

FORMATS_DIR = Path(__file__).resolve().parents[3] / "tests" / "data" / "formats"


def _write(tmp_path, rows: list, name: str = "rows.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name, expected", [("alpaca.jsonl", "alpaca"), ("sharegpt.jsonl", "sharegpt"),
                                            ("openai.jsonl", "openai"), ("text.jsonl", "text"),
                                            ("tokenized.parquet", "tokenized")])
def test_auto_detects_every_shipped_sample_file(name, expected):
    assert resolve_format(str(FORMATS_DIR / name), "auto") == expected
    assert read_records(str(FORMATS_DIR / name), "auto").format == expected


def test_explicit_format_wins_over_detection(tmp_path):
    # A row with both "text" and "messages": auto picks openai (more specific); text= reads the text.
    path = _write(tmp_path, [{"text": "plain words", "messages": [{"role": "user", "content": "hi"}]}])
    assert resolve_format(path, "auto") == "openai"
    assert read_records(path, "text").records[0].text == "plain words"


def test_alpaca_rows_become_one_exchange():
    records = read_records(str(FORMATS_DIR / "alpaca.jsonl"), "alpaca").records
    assert records[0].messages == (("user", "Add the two numbers.\n\n12 and 30"),
                                   ("assistant", "12 + 30 = 42. #### 42"))
    assert records[1].messages[0] == ("user", "What is 7 times 6?")  # empty input: no blank line
    assert records[4].messages[0] == ("system", "Answer with the working shown.")
    assert records[0].exchange() == ("Add the two numbers.\n\n12 and 30", "12 + 30 = 42. #### 42")


def test_sharegpt_and_openai_roles_map_to_chat_roles():
    share = read_records(str(FORMATS_DIR / "sharegpt.jsonl"), "sharegpt").records
    assert [role for role, _ in share[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert share[3].messages[0] == ("system", "Be brief.") and share[3].messages[-1] == ("user", "Thanks!")
    assert share[1].exchange() is None and share[0].exchange() is not None
    chats = read_records(str(FORMATS_DIR / "openai.jsonl"), "openai").records
    assert chats[2].messages[0] == ("user", "What is 6 + 7?")  # list-of-parts content joined
    assert chats[3].messages[0] == ("system", "Reply in one line.")  # developer -> system


def test_tokenized_masks_from_loss_mask_and_labels():
    records = read_records(str(FORMATS_DIR / "tokenized.parquet"), "tokenized").records
    first, plain, labelled = records
    assert first.loss_mask[:21] == (False,) * 21 and all(first.loss_mask[21:])
    assert all(plain.loss_mask) and len(plain.token_ids) == 45
    assert labelled.loss_mask == (False,) * 3 + (True,) * 12


BAD_ROWS = {
    "unknown_role": ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]},
                     "unknown role 'tool'"),
    "openai_unknown_role": ("openai", {"messages": [{"role": "user", "content": "q"},
                                                    {"role": "function", "content": "x"}]}, "unknown role 'function'"),
    "empty_conversation": ("openai", {"messages": []}, "empty conversation"),
    "no_assistant": ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    "empty_assistant": ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                   "content": " "}]},
                        "empty assistant message at turn 2"),
    "late_system": ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                            {"role": "assistant", "content": "a"}]}, "system message at turn 2"),
    "mixed_schema": ("alpaca", {"messages": [{"role": "user", "content": "q"}]}, "not an alpaca row: missing"),
    "wrong_turn_shape": ("sharegpt", {"conversations": [{"role": "user", "content": "q"}]},
                         "conversations[1] must be an object with 'from' and 'value'"),
    "non_string_content": ("openai", {"messages": [{"role": "user", "content": 3},
                                                   {"role": "assistant", "content": "a"}]}, "messages[1]: content"),
    "empty_text": ("text", {"text": "  "}, "'text' must be a non-empty string"),
    "shifted_labels": ("tokenized", {"input_ids": [5, 6, 7], "labels": [6, 7, -100]},
                       "labels[0]=6 differs from input_ids[0]=5"),
    "mask_length": ("tokenized", {"input_ids": [5, 6, 7], "loss_mask": [1, 1]}, "'loss_mask' must be a list of 3"),
    "mask_and_labels": ("tokenized", {"input_ids": [5], "loss_mask": [1], "labels": [5]}, "not both"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_and_line(tmp_path, case):
    fmt, bad, expected = BAD_ROWS[case]
    good = {"alpaca": {"instruction": "i", "output": "o"}, "text": {"text": "t"},
            "tokenized": {"input_ids": [1, 2]}}.get(fmt, {"messages": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]})
    if fmt == "sharegpt":
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write(tmp_path, [good, bad])
    with pytest.raises(DataError) as caught:
        read_records(path, fmt)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and expected in message and "\n" not in message, message
    skipped = read_records(path, fmt, on_error="skip")
    assert len(skipped.records) == 1 and skipped.skipped[0].startswith(f"{path}:2: ")


def test_mixed_schemas_in_one_file_fail_on_the_odd_row(tmp_path):
    path = _write(tmp_path, [{"instruction": "i", "output": "o"}, {"text": "a document"}])
    with pytest.raises(DataError, match=r"rows.jsonl:2: not an alpaca row: missing 'instruction', 'output'"):
        read_records(path, "auto")


def test_undetectable_first_row(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"rows.jsonl:1: cannot detect data.format from the row's keys"):
        read_records(path, "auto")
