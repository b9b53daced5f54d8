"""Aligned teacher/student sequences of question/answer records: shots, trimming to fit, skipping, and the
alignment guard."""

from __future__ import annotations

import copy

import pytest

from kd.data.formats import Record
from kd.data.prompting import PromptPair, prompt_ids
from kd.data.sequences import RecordSettings, SequenceReport, build_record_samples, check_alignment
from pipeline.assets.synthetic_task import generate_rows
from pipeline.assets.tiny_tokenizer import task_texts, train_tokenizer


@pytest.fixture(scope="module")
def rows():
    return generate_rows(60, seed=7)


@pytest.fixture(scope="module")
def tokenizer(rows):
    return train_tokenizer(task_texts(rows), vocab_size=300)


def _samples(rows) -> list[Record]:
    return [Record(f"s:{i}", i, f"f:{i + 1}", messages=(("user", r["question"]), ("assistant", r["answer"])),
                   question_answer=True) for i, r in enumerate(rows)]


def build_question_answer_samples(records: list[Record], pool: list[Record], tokenizer, *, num_fewshot: int, seed: int,
                          max_seq_len: int, max_teacher_len: int | None) -> SequenceReport:
    return build_record_samples(records, pool, tokenizer, RecordSettings(num_fewshot, seed, max_seq_len,
                                                                         max_teacher_len))


@pytest.mark.parametrize("chat", [True, False])
def test_teacher_and_student_end_in_the_same_answer(rows, tokenizer, chat):
    tok = tokenizer if chat else copy.deepcopy(tokenizer)
    if not chat:
        tok.chat_template = None
    samples = _samples(rows)
    report = build_question_answer_samples(samples[:10], samples, tok, num_fewshot=3, seed=0, max_seq_len=512,
                                   max_teacher_len=None)
    assert len(report.built) == 10 and report.skipped == [] and report.trimmed == 0
    for item in report.built:
        pair = item.pair
        n = len(pair.label_positions)
        assert pair.input_ids[-n:] == pair.teacher_input_ids[-n:]
        assert pair.label_positions == list(range(len(pair.input_ids) - n, len(pair.input_ids)))
        assert pair.teacher_positions == list(range(len(pair.teacher_input_ids) - n, len(pair.teacher_input_ids)))
        assert len(pair.teacher_input_ids) > len(pair.input_ids) and item.num_shots == 3
        student_prompt = prompt_ids(tok, samples[int(item.sample_id[2:])].exchange()[0], [])
        assert pair.input_ids[:len(student_prompt)] == student_prompt


def test_zero_shots_gives_identical_sequences(rows, tokenizer):
    samples = _samples(rows)
    report = build_question_answer_samples(samples[:5], samples, tokenizer, num_fewshot=0, seed=0, max_seq_len=512,
                                   max_teacher_len=None)
    for item in report.built:
        assert item.pair.teacher_input_ids == item.pair.input_ids
        assert item.pair.teacher_positions == item.pair.label_positions


def test_sample_is_never_its_own_shot(rows, tokenizer):
    samples = _samples(rows[:4])
    report = build_question_answer_samples(samples, samples, tokenizer, num_fewshot=3, seed=5, max_seq_len=512,
                                   max_teacher_len=None)
    for item, sample in zip(report.built, samples):
        prompt_part = item.pair.teacher_input_ids[:item.pair.teacher_positions[0]]
        own_question = tokenizer.encode(sample.exchange()[0], add_special_tokens=False)
        text = tokenizer.decode(prompt_part)
        assert text.count(sample.exchange()[0]) == 1, "the sample's own question appears only once (as the question)"
        assert own_question


def test_long_teacher_context_drops_shots_then_skips(rows, tokenizer):
    samples = _samples(rows)
    full = build_question_answer_samples(samples[:6], samples, tokenizer, num_fewshot=3, seed=0, max_seq_len=512,
                                 max_teacher_len=None)
    student_len = max(len(i.pair.input_ids) for i in full.built)
    limit = student_len + 60   # room for about one shot, not three
    trimmed = build_question_answer_samples(samples[:6], samples, tokenizer, num_fewshot=3, seed=0, max_seq_len=512,
                                    max_teacher_len=limit)
    assert trimmed.trimmed == 6 and all(i.num_shots < 3 for i in trimmed.built)
    assert all(len(i.pair.teacher_input_ids) <= limit for i in trimmed.built)
    tiny = build_question_answer_samples(samples[:6], samples, tokenizer, num_fewshot=3, seed=0, max_seq_len=8,
                                 max_teacher_len=None)
    assert tiny.built == [] and len(tiny.skipped) == 6 and "data.max_seq_len=8" in tiny.skipped[0]


def test_alignment_guard_refuses_misaligned_pairs():
    good = PromptPair([1, 2, 3, 4], [9, 3, 4], [1, 2], [2, 3])
    check_alignment("ok", good)
    bad = PromptPair([1, 2, 3, 4], [9, 3, 4], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="sample bad: misaligned"):
        check_alignment("bad", bad)
