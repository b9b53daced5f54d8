"""Reading GSM8K-format (question/answer) rows: good rows, every kind of bad row, skip policy, parquet."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.data.formats import read_records
from kd.errors import DataError

GOOD = {"question": "Mia has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7. #### 7"}


def read_question_answers(spec: str, **options):
    """The question/answer reader under test: read_records with data.format=gsm8k."""
    return read_records(spec, "gsm8k", **options)


def _jsonl(tmp_path, rows: list, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_reads_rows_with_stable_ids(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {**GOOD, "answer": "x #### 1,200"}, {**GOOD, "id": "q-9"}])
    result = read_question_answers(path)
    assert [s.sample_id for s in result.records] == ["data:1", "data:2", "q-9"]
    assert [s.row_index for s in result.records] == [0, 1, 2]
    assert result.records[0].exchange()[0] == GOOD["question"] and result.skipped == []
    assert result.records[0].kind == "qa" and result.records[1].exchange()[1] == "x #### 1,200"


def test_max_samples_keeps_first_good_rows(tmp_path):
    path = _jsonl(tmp_path, [GOOD] * 5)
    assert len(read_question_answers(path, max_samples=2).records) == 2


BAD_ROWS = {
    "malformed_json": ('{"question": "q", "answer": ', "malformed JSON"),
    "missing_field": ({"question": "q"}, "missing field 'answer'"),
    "no_final_answer": ({"question": "q", "answer": "it is 7"}, "no final '#### <number>'"),
    "empty_answer": ({"question": "q", "answer": "  "}, "empty answer"),
    "not_an_object": ([1, 2], "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line(tmp_path, case):
    bad, expected = BAD_ROWS[case]
    path = _jsonl(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        read_question_answers(path)
    assert f"{path}:2: " in str(info.value) and expected in str(info.value)
    skipped = read_question_answers(path, on_error="skip")
    assert len(skipped.records) == 2 and len(skipped.skipped) == 1
    assert skipped.skipped[0].startswith(f"{path}:2: ")


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_question_answers(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        read_question_answers(str(tmp_path))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        read_question_answers(str(binary))


def test_duplicate_ids_refused(tmp_path):
    path = _jsonl(tmp_path, [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])
    with pytest.raises(DataError, match="duplicate sample id 'a'"):
        read_question_answers(path)


def test_all_rows_bad_is_an_error(tmp_path):
    path = _jsonl(tmp_path, [{"question": "q", "answer": "no mark"}])
    with pytest.raises(DataError, match="no usable samples"):
        read_question_answers(path, on_error="skip")


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"question": "q", "answer": None}]), path)
    with pytest.raises(DataError, match=r"data.parquet:row 2: missing field 'answer'"):
        read_question_answers(str(path))
    assert [s.sample_id for s in read_question_answers(str(path), on_error="skip").records] == ["data:1"]
