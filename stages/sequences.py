"""Aligned teacher/student token sequences for stage one.

For sample ``i`` the teacher sees ``num_fewshot`` worked examples drawn from the shot pool with
:func:`stages.prompting.draw_shots` (seeded by ``seed`` and the sample's row index, never the sample itself),
then the question and answer; the student sees the question and the same answer ids.

Length limits: a teacher sequence longer than ``max_teacher_len`` drops shots from the end of its draw until it
fits (fewer shots, same question and answer). A student sequence longer than ``max_seq_len`` — or a teacher
sequence that does not fit even with zero shots — is skipped and counted, never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.prompting import PromptPair, answer_ids, draw_shots, pair_from_ids, prompt_ids
from stages.samples import Sample


@dataclass(frozen=True)
class AlignedSample:
    """A sample ready to score: its id and aligned sequences."""

    sample_id: str
    pair: PromptPair
    num_shots: int
    """Shots actually used (fewer than asked when the teacher context was trimmed)."""
    source: str | None = None
    """Name of the data source (mixture entry) the sample was drawn from; recorded in the cache."""


@dataclass
class SequenceReport:
    """What happened while building sequences."""

    built: list[AlignedSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """``sample_id: reason`` for samples that do not fit."""
    trimmed: int = 0
    """Samples whose teacher context lost shots to fit ``max_teacher_len``."""


class _ShotPool:
    """The pool's (question, answer) texts by index, and the index of each question (to exclude the sample)."""

    def __init__(self, pool: list[Sample]):
        self.pool = pool
        self.index_by_question = {s.question: i for i, s in enumerate(pool)}

    def shots(self, indices: list[int]) -> list[tuple[str, str]]:
        return [(self.pool[i].question, self.pool[i].answer) for i in indices]


def check_alignment(sample_id: str, pair: PromptPair) -> None:
    """teacher_input_ids[tp] == input_ids[p] for every pair, or ValueError naming the sample and position."""
    if len(pair.label_positions) != len(pair.teacher_positions):
        raise ValueError(f"sample {sample_id}: {len(pair.label_positions)} label positions but "
                         f"{len(pair.teacher_positions)} teacher positions")
    for p, tp in zip(pair.label_positions, pair.teacher_positions):
        if p < 1 or tp < 1 or pair.teacher_input_ids[tp] != pair.input_ids[p]:
            raise ValueError(f"sample {sample_id}: misaligned answer token (student position {p}, teacher "
                             f"position {tp}); refusing to write a misaligned cache")


def build_aligned_samples(samples: list[Sample], pool: list[Sample], tokenizer, *, num_fewshot: int, seed: int,
                          max_seq_len: int, max_teacher_len: int | None) -> SequenceReport:
    """Build and check the aligned sequences for ``samples``, drawing shots from ``pool``."""
    report = SequenceReport()
    shot_pool = _ShotPool(pool)
    for sample in samples:
        answer = answer_ids(tokenizer, sample.answer)
        if len(answer) == 0:
            report.skipped.append(f"{sample.sample_id}: answer tokenizes to nothing")
            continue
        student_prompt = prompt_ids(tokenizer, sample.question, [])
        if len(student_prompt) + len(answer) > max_seq_len:
            report.skipped.append(f"{sample.sample_id}: student sequence has {len(student_prompt) + len(answer)} "
                                  f"tokens > data.max_seq_len={max_seq_len}")
            continue
        exclude = shot_pool.index_by_question.get(sample.question)
        indices = draw_shots(len(pool), num_fewshot, seed, sample.row_index, exclude)
        fitted = _fit_teacher(student_prompt, answer, sample.question, shot_pool.shots(indices), tokenizer,
                              max_teacher_len)
        if fitted is None:
            report.skipped.append(f"{sample.sample_id}: teacher sequence exceeds max_teacher_len="
                                  f"{max_teacher_len} even without shots")
            continue
        pair, used = fitted
        report.trimmed += int(used < len(indices))
        check_alignment(sample.sample_id, pair)
        report.built.append(AlignedSample(sample.sample_id, pair, used))
    return report


def _fit_teacher(student_prompt: list[int], answer: list[int], question: str, shots: list[tuple[str, str]],
                 tokenizer, max_teacher_len: int | None) -> tuple[PromptPair, int] | None:
    """(pair, shots kept) for the longest prefix of ``shots`` that fits, or None when not even zero shots fit."""
    for keep in range(len(shots), -1, -1):
        teacher_prompt = prompt_ids(tokenizer, question, shots[:keep]) if keep else student_prompt
        if max_teacher_len is None or len(teacher_prompt) + len(answer) <= max_teacher_len:
            return pair_from_ids(student_prompt, teacher_prompt, answer), keep
    return None
