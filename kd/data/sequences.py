"""Aligned teacher/student token sequences for stage one, from records of every format (:mod:`kd.data.formats`).

One builder, :class:`RecordBuilder`, turns every record into an :class:`AlignedSample`, by its kind:

Question/answer rows (``gsm8k``). The teacher sees ``num_fewshot`` worked examples drawn from the shot pool with
:func:`kd.data.prompting.draw_shots` (seeded by ``seed`` and the row index, never the sample itself), then the
question and answer; the student sees the question and the same answer ids (:mod:`kd.data.prompting`).

Chats (``alpaca``, ``sharegpt``, ``openai``). Rendered by :mod:`kd.data.chat`: every assistant turn is distilled;
the teacher also sees ``data.teacher_system_prompt`` and ``num_fewshot`` one-exchange shots from the pool.

Length limits: a teacher sequence longer than ``max_teacher_len`` drops shots from the end of its draw until it
fits (fewer shots, same question and answer). A student sequence longer than ``max_seq_len`` — or a teacher
sequence that does not fit even with zero shots — is skipped and counted, never truncated.

Text and pre-tokenized records. Every token is distilled (pre-tokenized: where ``loss_mask`` is 1); teacher
and student sequences are identical. Text is ``[bos] + encode(text) + [eos]``. A document longer than
``data.max_seq_len`` is split into windows of ``max_seq_len`` tokens starting every ``window_stride`` tokens
(default: ``max_seq_len``, no overlap); a window distils only tokens no earlier window distilled, so each token
is distilled once, with up to ``max_seq_len - stride`` tokens of extra context. Position 0 of a window has no
context and is never distilled (with no overlap that is one token per window after the first). Window ``k``
of sample ``id`` is ``id#wk``. Nothing is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from kd.data.chat import chat_pair, conversations
from kd.data.formats import Record
from kd.data.prompting import (
    PromptPair,
    answer_ids,
    assign_shot_set,
    bos_prefix,
    draw_shot_sets,
    draw_shots,
    pair_from_ids,
    prompt_ids,
)
from kd.errors import DataError


@dataclass(frozen=True)
class AlignedSample:
    """A sample ready to score: its id and aligned sequences."""

    sample_id: str
    pair: PromptPair
    num_shots: int
    """Shots actually used (fewer than asked when the teacher context was trimmed)."""
    source: str | None = None
    """Name of the data source (mixture entry) the sample was drawn from; recorded in the cache."""
    shot_set: int | None = None
    """``data.fewshot_sets``: the shared shot set the teacher prompt uses (None: shots drawn for this sample)."""


@dataclass
class SequenceReport:
    """What happened while building sequences."""

    built: list[AlignedSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """``sample_id: reason`` for samples that do not fit."""
    trimmed: int = 0
    """Samples whose teacher context lost shots to fit ``max_teacher_len``."""


@dataclass
class TrainingSet:
    """The aligned samples stage one scores, with what was skipped and what the user should be told."""

    built: list[AlignedSample]
    sources: list[str]
    """Source names, in the order the cache records them."""
    skipped: list[str] = field(default_factory=list)
    trimmed: int = 0
    notes: list[str] = field(default_factory=list)
    """What was decided about the data (detected format, mixture draw), printed before scoring."""
    formats: dict[str, str] = field(default_factory=dict)
    """The data format of each source."""


def check_alignment(sample_id: str, pair: PromptPair) -> None:
    """teacher_input_ids[tp] == input_ids[p] for every pair, or ValueError naming the sample and position."""
    if len(pair.label_positions) != len(pair.teacher_positions):
        raise ValueError(f"sample {sample_id}: {len(pair.label_positions)} label positions but "
                         f"{len(pair.teacher_positions)} teacher positions")
    for p, tp in zip(pair.label_positions, pair.teacher_positions):
        if p < 1 or tp < 1 or pair.teacher_input_ids[tp] != pair.input_ids[p]:
            raise ValueError(f"sample {sample_id}: misaligned answer token (student position {p}, teacher "
                             f"position {tp}); refusing to write a misaligned cache")


FEWSHOT_ANSWERS = ("gold", "shuffled")
"""``data.fewshot_answers``: worked examples keep their own answers, or (an ablation: does the teacher use the
examples' content or only their form?) each shows the answer of another pool question, a seeded derangement."""


def shuffled_answers(exchanges: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The same questions, each paired with another exchange's answer (a cyclic shift of a seeded permutation,
    so no exchange keeps its own answer when the pool has two or more)."""
    if len(exchanges) < 2:
        return list(exchanges)
    order = np.random.default_rng([seed, 4099]).permutation(len(exchanges))
    answers = [""] * len(exchanges)
    for position, index in enumerate(order):
        answers[index] = exchanges[order[(position + 1) % len(order)]][1]
    return [(question, answer) for (question, _), answer in zip(exchanges, answers, strict=True)]


@dataclass(frozen=True)
class RecordSettings:
    """The ``data.*`` settings that shape the sequences of every record."""

    num_fewshot: int
    seed: int
    max_seq_len: int
    max_teacher_len: int | None
    window_stride: int | None = None
    system_prompt: str | None = None
    teacher_system_prompt: str | None = None
    fewshot_sets: int = 0
    fewshot_answers: str = "gold"


def token_windows(ids: list[int], mask: list[bool], max_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """[(window ids, distilled positions local to the window)] covering ``ids``; each masked token once."""
    starts = [0]
    while starts[-1] + max_len < len(ids):
        starts.append(starts[-1] + stride)
    windows, distilled_until = [], 0
    for start in starts:
        stop = min(start + max_len, len(ids))
        first = max(start + 1, distilled_until)
        windows.append((ids[start:stop], [g - start for g in range(first, stop) if mask[g]]))
        distilled_until = stop
    return windows


def _document_ids(tokenizer, record: Record) -> tuple[list[int], list[bool]]:
    if record.text is not None:
        ids = bos_prefix(tokenizer) + list(tokenizer.encode(record.text, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        return ids, [True] * len(ids)
    ids, mask = list(record.token_ids or ()), list(record.loss_mask or ())
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise DataError(f"{record.location}: input_ids holds {bad[0]} outside the tokenizer's vocabulary "
                        f"[0, {vocab}); the corpus was tokenized with another tokenizer")
    return ids, mask


def _build_document(record: Record, tokenizer, max_seq_len: int, stride: int, report: SequenceReport) -> None:
    ids, mask = _document_ids(tokenizer, record)
    windows = token_windows(ids, mask, max_seq_len, stride)
    for k, (window, positions) in enumerate(windows):
        sample_id = record.sample_id if len(windows) == 1 else f"{record.sample_id}#w{k}"
        if not positions:
            report.skipped.append(f"{sample_id}: nothing to distil (every token masked or already distilled)")
            continue
        pair = PromptPair(window, window, positions, positions)
        check_alignment(sample_id, pair)
        report.built.append(AlignedSample(sample_id, pair, 0))


def _accept(record: Record, pair: PromptPair, shots_kept: int, shots_drawn: int, report: SequenceReport,
            shot_set: int | None = None) -> None:
    """Add a built pair to the report (counted as trimmed when it lost shots), after the alignment guard."""
    report.trimmed += int(shots_kept < shots_drawn)
    check_alignment(record.sample_id, pair)
    report.built.append(AlignedSample(record.sample_id, pair, shots_kept, shot_set=shot_set))


def _draw(record: Record, pool_size: int, settings: RecordSettings, exclude: int | None) -> tuple[list[int], int | None]:
    """(pool indices of the record's shots, its shared shot set or None): one of ``data.fewshot_sets`` fixed
    sets, else the per-sample draw."""
    if not (settings.fewshot_sets and settings.num_fewshot):
        return draw_shots(pool_size, settings.num_fewshot, settings.seed, record.row_index, exclude), None
    shot_sets = draw_shot_sets(pool_size, settings.num_fewshot, settings.fewshot_sets, settings.seed)
    try:
        shot_set = assign_shot_set(shot_sets, settings.seed, record.row_index, exclude)
    except ValueError as problem:
        raise DataError(f"{record.location}: {problem}") from None
    return list(shot_sets[shot_set]), shot_set


def _skip_teacher_too_long(record: Record, settings: RecordSettings, report: SequenceReport) -> None:
    report.skipped.append(f"{record.sample_id}: teacher sequence exceeds max_teacher_len="
                          f"{settings.max_teacher_len} even without shots")


def _build_question_answer(record: Record, tokenizer, pool: list[tuple[str, str]], pool_index: dict[str, int],
                           settings: RecordSettings, report: SequenceReport) -> None:
    question, answer_text = record.exchange() or ("", "")
    answer = answer_ids(tokenizer, answer_text)
    if not answer:
        report.skipped.append(f"{record.sample_id}: answer tokenizes to nothing")
        return
    student_prompt = prompt_ids(tokenizer, question, [])
    if len(student_prompt) + len(answer) > settings.max_seq_len:
        report.skipped.append(f"{record.sample_id}: student sequence has {len(student_prompt) + len(answer)} "
                              f"tokens > data.max_seq_len={settings.max_seq_len}")
        return
    indices, shot_set = _draw(record, len(pool), settings, pool_index.get(question))
    shots = [pool[i] for i in indices]
    for keep in range(len(shots), -1, -1):
        teacher_prompt = prompt_ids(tokenizer, question, shots[:keep]) if keep else student_prompt
        if settings.max_teacher_len is None or len(teacher_prompt) + len(answer) <= settings.max_teacher_len:
            _accept(record, pair_from_ids(student_prompt, teacher_prompt, answer), keep, len(indices), report,
                    shot_set)
            return
    _skip_teacher_too_long(record, settings, report)


def _shot_pool(pool: list[Record], num_fewshot: int, location: str) -> list[tuple[str, str]]:
    exchanges = [x for x in (r.exchange() for r in pool) if x is not None]
    if num_fewshot and len(exchanges) <= num_fewshot:
        raise DataError(f"{location}: data.num_fewshot={num_fewshot} needs more than {num_fewshot} one-exchange "
                        f"(user, assistant) conversations in the shot pool, found {len(exchanges)}; lower "
                        "data.num_fewshot or set data.fewshot_pool")
    return exchanges


def _build_chat(record: Record, tokenizer, pool: list[tuple[str, str]], pool_index: dict[str, int],
                settings: RecordSettings, report: SequenceReport) -> None:
    exchange = record.exchange()
    exclude = pool_index.get(exchange[0]) if exchange else None
    indices, shot_set = _draw(record, len(pool), settings, exclude)
    for keep in range(len(indices), -1, -1):
        student, teacher, distil_from = conversations(record, [pool[i] for i in indices[:keep]],
                                                      settings.system_prompt, settings.teacher_system_prompt)
        try:
            pair = chat_pair(tokenizer, student, teacher, distil_from)
        except ValueError as problem:
            raise DataError(f"{record.location}: {problem}") from None
        if len(pair.input_ids) > settings.max_seq_len:
            report.skipped.append(f"{record.sample_id}: student sequence has {len(pair.input_ids)} tokens > "
                                  f"data.max_seq_len={settings.max_seq_len}")
            return
        if settings.max_teacher_len is None or len(pair.teacher_input_ids) <= settings.max_teacher_len:
            _accept(record, pair, keep, len(indices), report, shot_set)
            return
    _skip_teacher_too_long(record, settings, report)


class RecordBuilder:
    """Builds aligned sequences for records of one source; the shot pool is indexed once (mixtures call
    :meth:`build` chunk by chunk)."""

    def __init__(self, pool: list[Record], tokenizer, settings: RecordSettings):
        self.tokenizer, self.settings = tokenizer, settings
        with_shots = settings.num_fewshot and any(r.messages is not None for r in pool)
        self.exchanges = _shot_pool(pool, settings.num_fewshot, pool[0].location) if with_shots else []
        if self.exchanges and settings.fewshot_sets:
            try:  # the sets are drawn once here (cached): a pool too small for them stops before any sample
                draw_shot_sets(len(self.exchanges), settings.num_fewshot, settings.fewshot_sets, settings.seed)
            except ValueError as problem:
                raise DataError(f"{pool[0].location}: {problem}") from None
        if settings.fewshot_answers == "shuffled":
            self.exchanges = shuffled_answers(self.exchanges, settings.seed)
        self.pool_index = {question: i for i, (question, _) in enumerate(self.exchanges)}

    def build(self, records: list[Record]) -> SequenceReport:
        """Aligned sequences for ``records`` (question/answer and chat: shots from the pool; text/tokens: windows)."""
        report = SequenceReport()
        stride = self.settings.window_stride or self.settings.max_seq_len
        for record in records:
            if record.kind == "qa":
                _build_question_answer(record, self.tokenizer, self.exchanges, self.pool_index, self.settings,
                                       report)
            elif record.kind == "chat":
                _build_chat(record, self.tokenizer, self.exchanges, self.pool_index, self.settings, report)
            else:
                _build_document(record, self.tokenizer, self.settings.max_seq_len, stride, report)
        return report


def build_record_samples(records: list[Record], pool: list[Record], tokenizer,
                         settings: RecordSettings) -> SequenceReport:
    """Aligned sequences for ``records`` (question/answer and chat: shots from ``pool``; text/tokens: windows).
    Documents take no shots: ``num_fewshot`` applies to the question/answer and chat records of a source only."""
    return RecordBuilder(pool, tokenizer, settings).build(records)


def with_source(report: SequenceReport, source: str) -> SequenceReport:
    """The same report with every built sample tagged with ``source``."""
    report.built = [replace(sample, source=source) for sample in report.built]
    return report
