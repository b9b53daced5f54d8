"""`pipeline cache-teacher` on bad input: one line naming file:line / key / sample, exit 2, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from cache_schema import open_cache
from pipeline.cli import main as cli_main
from pipeline.config_loader import ASSETS_DIR

GOOD = {"question": "Mia has 3 apples and buys 4 more. How many apples does Mia have now?",
        "answer": "Mia starts with 3 apples. 3 + 4 = 7. #### 7"}


def _run(tmp_path, capsys, *overrides: str) -> tuple[int, str, str]:
    code = cli_main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress",
                     "teacher.backend=hf", "teacher.top_k=8", "data.num_fewshot=0",
                     f"cache.path={tmp_path}/cache", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def _data(tmp_path, rows: list) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


ROW_CASES = {
    "malformed_json": ('{"question": "q", ', "bad.jsonl:2: malformed JSON"),
    "missing_field": ({"answer": "#### 3"}, "bad.jsonl:2: missing field 'question'"),
    "no_final_answer": ({"question": "q", "answer": "seven"}, "bad.jsonl:2: answer has no final '#### <number>'"),
    "empty_answer": ({"question": "q", "answer": ""}, "bad.jsonl:2: empty answer"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_rows(tmp_path, capsys, case):
    bad, expected = ROW_CASES[case]
    code, _, err = _run(tmp_path, capsys, f"data.train={_data(tmp_path, [GOOD, bad, GOOD])}")
    _assert_one_line_error(code, err, expected, "data.on_error=skip")
    assert not (tmp_path / "cache").exists()


def test_skip_policy_skips_and_counts(tmp_path, capsys):
    rows = [GOOD, {"question": "q", "answer": "seven"}, {**GOOD, "question": "Leo has 2 pens. How many?"}]
    code, out, _ = _run(tmp_path, capsys, f"data.train={_data(tmp_path, rows)}", "data.on_error=skip")
    assert code == 0
    assert "skipped samples: 1" in out and "bad.jsonl:2: answer has no final" in out
    assert len(open_cache(tmp_path / "cache")) == 2


def test_unreadable_file(tmp_path, capsys):
    code, _, err = _run(tmp_path, capsys, f"data.train={tmp_path}/missing.jsonl")
    _assert_one_line_error(code, err, "missing.jsonl: file not found")


def test_too_long_samples_are_skipped_and_counted(tmp_path, capsys):
    long_q = {"question": "Mia " + "has many apples and " * 40 + "buys 4.", "answer": "3 + 4 = 7. #### 7"}
    code, out, _ = _run(tmp_path, capsys, f"data.train={_data(tmp_path, [GOOD, long_q])}", "data.max_seq_len=96")
    assert code == 0 and "skipped samples: 1" in out and "data.max_seq_len=96" in out
    assert len(open_cache(tmp_path / "cache")) == 1
    code, _, err = _run(tmp_path, capsys, f"data.train={_data(tmp_path, [long_q])}", "data.max_seq_len=96",
                        f"cache.path={tmp_path}/other")
    _assert_one_line_error(code, err, "no sample fits")


def test_k_larger_than_the_vocabulary(tmp_path, capsys):
    code, _, err = _run(tmp_path, capsys, "teacher.top_k=100000")
    _assert_one_line_error(code, err, "teacher.top_k=100000", "lower teacher.top_k")


def test_teacher_and_student_tokenizers_must_match(tmp_path, capsys):
    from pipeline.assets.synthetic_task import generate_rows
    from pipeline.assets.tiny_tokenizer import task_texts, train_tokenizer

    other = tmp_path / "other_student"
    shutil.copytree(ASSETS_DIR / "tiny" / "student", other)
    train_tokenizer(task_texts(generate_rows(50, seed=3)), vocab_size=300).save_pretrained(other)
    code, _, err = _run(tmp_path, capsys, f"student.model={other}")
    _assert_one_line_error(code, err, "different tokenizers")


def test_vllm_missing_suggests_hf(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)      # `import vllm` now raises ImportError
    code, _, err = _run(tmp_path, capsys, "teacher.backend=vllm")
    _assert_one_line_error(code, err, "teacher.backend=hf")


def test_existing_cache_of_another_run_is_kept(tmp_path, capsys):
    assert _run(tmp_path, capsys, "data.max_samples=4")[0] == 0
    before = open_cache(tmp_path / "cache").meta["fingerprints"]
    code, _, err = _run(tmp_path, capsys, "data.max_samples=5")
    _assert_one_line_error(code, err, "--overwrite")
    assert open_cache(tmp_path / "cache").meta["fingerprints"] == before


def test_foreign_directory_is_never_touched(tmp_path, capsys):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        code, _, err = _run(tmp_path, capsys, "data.max_samples=4", *flags)
        _assert_one_line_error(code, err, "not a teacher cache")
        assert (target / "notes.txt").read_text() == "mine"
