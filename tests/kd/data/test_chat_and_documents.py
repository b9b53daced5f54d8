"""Chat and document sequences: assistant-only positions, teacher-only context, plain fallback, windows."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from kd.data.chat import chat_pair, conversations
from kd.data.formats import Record
from kd.data.prompting import build_pair
from kd.data.sequences import RecordSettings, build_record_samples, token_windows
from kd.errors import DataError
from pipeline.config_loader import ASSETS_DIR

CHAT = [("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5."), ("user", "And 4 + 4?"), ("assistant", "8")]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny" / "tokenizer")


def _assistant_spans_by_prefix(tokenizer, messages):
    """Reference: assistant token positions from prefix renderings of the template (not the sentinel method)."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    positions = []
    for i, (role, _) in enumerate(messages):
        if role == "assistant":
            start = len(tokenizer.apply_chat_template(dicts[:i], add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
            rendered = tokenizer.apply_chat_template(dicts[:i + 1], tokenize=False).rstrip("\n")
            positions += range(start, len(tokenizer.encode(rendered, add_special_tokens=False)))
    return positions


def test_multi_turn_positions_are_exactly_the_assistant_tokens(tokenizer):
    pair = chat_pair(tokenizer, CHAT, CHAT, 0)
    assert pair.label_positions == _assistant_spans_by_prefix(tokenizer, CHAT)
    full = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in CHAT], tokenize=False)
    assert pair.input_ids == tokenizer.encode(full.rstrip("\n"), add_special_tokens=False)
    assert tokenizer.decode([pair.input_ids[p] for p in pair.label_positions]) == "2 + 3 = 5.<|im_end|>8<|im_end|>"


def test_one_exchange_chat_equals_the_gsm8k_pair(tokenizer):
    assert chat_pair(tokenizer, CHAT[:2], CHAT[:2], 0) == build_pair(tokenizer, CHAT[0][1], CHAT[1][1], [])


def test_teacher_only_system_prompt_and_shots(tokenizer):
    record = Record("r", 0, "f:1", messages=(("system", "Be brief."), *CHAT))
    student, teacher, start = conversations(record, [("1 + 1?", "2")], None, "Show your work.")
    assert student[0] == ("system", "Be brief.")
    assert teacher[:3] == [("system", "Show your work.\n\nBe brief."), ("user", "1 + 1?"), ("assistant", "2")]
    assert start == 3
    pair = chat_pair(tokenizer, student, teacher, start)
    assert "Show your work" not in tokenizer.decode(pair.input_ids)
    assert "Show your work" in tokenizer.decode(pair.teacher_input_ids)
    # the shot's answer is teacher context, not distilled: same number of distilled tokens on both sides
    assert [pair.input_ids[p] for p in pair.label_positions] == \
        [pair.teacher_input_ids[p] for p in pair.teacher_positions]
    assert pair.label_positions == _assistant_spans_by_prefix(tokenizer, student)


def test_student_system_prompt_only_when_the_row_has_none():
    record = Record("r", 0, "f:1", messages=CHAT[:2])
    student, teacher, start = conversations(record, [], "Default.", None)
    assert student[0] == ("system", "Default.") and teacher == student and start == 1


def test_plain_fallback_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    pair = chat_pair(plain, [("system", "S"), *CHAT], [("system", "S"), *CHAT], 0)
    eos = plain.eos_token
    assert plain.decode(pair.input_ids) == f"System: S\nUser: What is 2 + 3?\nAssistant: 2 + 3 = 5.{eos}\n" \
                                           f"User: And 4 + 4?\nAssistant: 8{eos}"
    assert plain.decode([pair.input_ids[p] for p in pair.label_positions]) == f" 2 + 3 = 5.{eos} 8{eos}"


@pytest.mark.parametrize("length, window, stride", [(10, 4, 2), (10, 4, 4), (9, 4, 3), (3, 4, 4), (100, 16, 5)])
def test_windows_distil_every_token_once(length, window, stride):
    ids = list(range(100, 100 + length))
    windows = token_windows(ids, [True] * length, window, stride)
    covered = []
    for k, (window_ids, positions) in enumerate(windows):
        start = k * stride
        assert window_ids == ids[start:start + window] and len(window_ids) <= window
        assert all(p >= 1 for p in positions)
        covered += [start + p for p in positions]
    assert windows[-1][0][-1] == ids[-1]  # nothing truncated
    # every token once, except where a window's first token has no context (no overlap: one per window)
    lost = {k * stride for k in range(len(windows))} - {p for p in range(length) if
                                                       any(k * stride < p < k * stride + window
                                                           for k in range(len(windows)))}
    assert sorted(covered) == sorted(set(covered)) == sorted(set(range(length)) - lost)


def test_windows_follow_the_loss_mask():
    mask = [False, False, True, True, False, True]
    windows = token_windows(list(range(6)), mask, 4, 2)
    assert [positions for _, positions in windows] == [[2, 3], [3]]


def test_long_chats_are_skipped_and_counted_never_truncated(tokenizer):
    short_length = len(chat_pair(tokenizer, CHAT[:2], CHAT[:2], 0).input_ids)
    long_length = len(chat_pair(tokenizer, CHAT, CHAT, 0).input_ids)
    settings = RecordSettings(num_fewshot=0, seed=0, max_seq_len=short_length, max_teacher_len=None)
    short = Record("short", 0, "f:1", messages=CHAT[:2])
    long = Record("long", 1, "f:2", messages=CHAT)
    report = build_record_samples([short, long], [], tokenizer, settings)
    assert [s.sample_id for s in report.built] == ["short"]
    assert report.skipped == [f"long: student sequence has {long_length} tokens > data.max_seq_len={short_length}"]


def test_token_ids_outside_the_vocabulary_name_the_row(tokenizer):
    settings = RecordSettings(num_fewshot=0, seed=0, max_seq_len=64, max_teacher_len=None)
    record = Record("t", 0, "corpus.parquet:row 1", token_ids=(1, 2, 99999), loss_mask=(True, True, True))
    with pytest.raises(DataError, match=r"corpus.parquet:row 1: input_ids holds 99999 outside the tokenizer's"):
        build_record_samples([record], [], tokenizer, settings)


def test_shots_need_enough_one_exchange_conversations(tokenizer):
    settings = RecordSettings(num_fewshot=2, seed=0, max_seq_len=256, max_teacher_len=None)
    pool = [Record(f"r{i}", i, f"f:{i + 1}", messages=(("user", f"{i} + 1?"), ("assistant", str(i + 1))))
            for i in range(3)]
    report = build_record_samples(pool, pool, tokenizer, settings)
    assert [s.num_shots for s in report.built] == [2, 2, 2]
    for sample, record in zip(report.built, pool):  # a sample is never its own shot
        teacher_text = tokenizer.decode(sample.pair.teacher_input_ids)
        assert teacher_text.count(record.messages[0][1]) == 1
    with pytest.raises(DataError, match="needs more than 2 one-exchange"):
        build_record_samples(pool[:2], pool[:2], tokenizer, settings)
