"""Aligned teacher/student sequences for chat, text and pre-tokenized records (``stages.data_formats``).

Chats. The conversation is rendered with the tokenizer's chat template (Qwen3 thinking disabled) with every
assistant message replaced by a sentinel; the text between sentinels is tokenized as is, and each assistant
message becomes ``encode(content) + end_of_turn_ids`` — the same convention as GSM8K answers
(:mod:`stages.prompting`), so a one-exchange chat gives exactly the GSM8K ids. **Every assistant turn is
distilled** (its content and its end of turn), nothing else; turns after the last assistant turn are dropped
(nothing to predict there). Without a chat template the documented plain chat template is used::

    [bos]System: {system}\\nUser: {u1}\\nAssistant: {a1}[eos]\\nUser: {u2}\\nAssistant: {a2}[eos]

where `` {a}[eos]`` (leading space included) is distilled.

Teacher context. The student sees the conversation (with ``data.system_prompt`` as its system message when
the row has none). The teacher additionally sees ``data.teacher_system_prompt`` (the *privileged teacher
context*: instructions the student must learn to follow without seeing them; merged in front of the row's
own system message) and ``num_fewshot`` worked exchanges drawn from one-exchange records of the shot pool,
placed after the system message. Shots are dropped from the end until the teacher sequence fits.

Text and pre-tokenized records. Every token is distilled (pre-tokenized: where ``loss_mask`` is 1); teacher
and student sequences are identical. Text is ``[bos] + encode(text) + [eos]``. A document longer than
``data.max_seq_len`` is split into windows of ``max_seq_len`` tokens starting every ``window_stride`` tokens
(default: ``max_seq_len``, no overlap); a window distils only tokens no earlier window distilled, so each token
is distilled once, with up to ``max_seq_len - stride`` tokens of extra context. Position 0 of a window has no
context and is never distilled (with no overlap that is one token per window after the first). Window ``k``
of sample ``id`` is ``id#wk``. Nothing is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.errors import DataError
from stages.data_formats import Record
from stages.prompting import (PromptPair, bos_prefix, draw_shots, end_of_turn_ids, end_of_turn_text,
                              has_chat_template, render_chat_text)
from stages.sequences import AlignedSample, SequenceReport, check_alignment

_PLAIN_ROLE = {"system": "System", "user": "User"}


@dataclass(frozen=True)
class Segment:
    """A run of token ids and whether they are distilled (an assistant turn of the real conversation)."""

    ids: list[int]
    distilled: bool


def _sentinel(index: int) -> str:
    return f"\u2063KD-ASSISTANT-{index}\u2063"


def _template_segments(tokenizer, messages: list[tuple[str, str]], distil_from: int) -> list[Segment]:
    marked = [{"role": role, "content": _sentinel(i) if role == "assistant" else content}
              for i, (role, content) in enumerate(messages)]
    rest = render_chat_text(tokenizer, marked)
    eot_text, eot_ids = end_of_turn_text(tokenizer), end_of_turn_ids(tokenizer)
    segments: list[Segment] = []
    after_assistant = False
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        before, found, rest = rest.partition(_sentinel(i))
        if not found:
            raise ValueError("the chat template does not render assistant messages verbatim; cannot locate turn "
                             f"{i + 1}")
        if after_assistant:
            before = _drop_end_of_turn(before, eot_text)
        if before:
            segments.append(Segment(list(tokenizer.encode(before, add_special_tokens=False)), False))
        segments.append(Segment(list(tokenizer.encode(content, add_special_tokens=False)) + eot_ids,
                                i >= distil_from))
        after_assistant = True
    return segments


def _drop_end_of_turn(text: str, eot_text: str) -> str:
    if not text.startswith(eot_text):
        raise ValueError(f"the chat template writes {text[:20]!r} after an assistant message, not its end of turn "
                         f"{eot_text!r}")
    return text[len(eot_text):]


def _plain_segments(tokenizer, messages: list[tuple[str, str]], distil_from: int) -> list[Segment]:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no chat template and no eos token; set tokenizer.eos_token")
    segments = [Segment(bos_prefix(tokenizer), False)]
    pending = ""
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            pending += f"{_PLAIN_ROLE[role]}: {content}\n"
            continue
        segments.append(Segment(list(tokenizer.encode(pending + "Assistant:", add_special_tokens=False)), False))
        answer = list(tokenizer.encode(" " + content, add_special_tokens=False)) + [int(tokenizer.eos_token_id)]
        segments.append(Segment(answer, i >= distil_from))
        pending = "\n"
    return segments


def chat_segments(tokenizer, messages: list[tuple[str, str]], distil_from: int = 0) -> list[Segment]:
    """Token segments of a conversation up to its last assistant turn; assistant turns at message index >=
    ``distil_from`` are distilled (earlier ones are few-shot context)."""
    if has_chat_template(tokenizer):
        return _template_segments(tokenizer, messages, distil_from)
    return _plain_segments(tokenizer, messages, distil_from)


def _flatten(segments: list[Segment]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    positions: list[int] = []
    for segment in segments:
        if segment.distilled:
            positions += range(len(ids), len(ids) + len(segment.ids))
        ids += segment.ids
    return ids, positions


def chat_pair(tokenizer, student_messages: list[tuple[str, str]], teacher_messages: list[tuple[str, str]],
              teacher_distil_from: int) -> PromptPair:
    """Student and teacher sequences of one conversation with their distilled (assistant) positions paired."""
    input_ids, positions = _flatten(chat_segments(tokenizer, student_messages))
    teacher_ids, teacher_positions = _flatten(chat_segments(tokenizer, teacher_messages, teacher_distil_from))
    if len(positions) != len(teacher_positions):
        raise ValueError(f"teacher and student conversations distil {len(teacher_positions)} and {len(positions)} "
                         "tokens; the chat template renders assistant turns differently with the teacher context")
    # A conversation opening with an assistant turn under a template that writes nothing before it: the
    # first token has no context on the student side, so that pair is not distilled.
    keep = [j for j, (p, tp) in enumerate(zip(positions, teacher_positions)) if p >= 1 and tp >= 1]
    return PromptPair(teacher_ids, input_ids, [positions[j] for j in keep], [teacher_positions[j] for j in keep])


def conversations(record: Record, shots: list[tuple[str, str]], system_prompt: str | None,
                  teacher_system_prompt: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """(student messages, teacher messages, index of the first real message in the teacher's)."""
    student = list(record.messages or ())
    if system_prompt and (not student or student[0][0] != "system"):
        student = [("system", system_prompt)] + student
    head, body = (student[:1], student[1:]) if student and student[0][0] == "system" else ([], student)
    if teacher_system_prompt:
        head = [("system", teacher_system_prompt + (f"\n\n{head[0][1]}" if head else ""))]
    shot_turns = [turn for question, answer in shots for turn in (("user", question), ("assistant", answer))]
    teacher = head + shot_turns + body
    return student, teacher, len(head) + len(shot_turns)


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


@dataclass(frozen=True)
class RecordSettings:
    """The ``data.*`` settings that shape sequences of non-GSM8K records."""

    num_fewshot: int
    seed: int
    max_seq_len: int
    max_teacher_len: int | None
    window_stride: int | None = None
    system_prompt: str | None = None
    teacher_system_prompt: str | None = None


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
    indices = draw_shots(len(pool), settings.num_fewshot, settings.seed, record.row_index, exclude)
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
            report.trimmed += int(keep < len(indices))
            check_alignment(record.sample_id, pair)
            report.built.append(AlignedSample(record.sample_id, pair, keep))
            return
    report.skipped.append(f"{record.sample_id}: teacher sequence exceeds max_teacher_len="
                          f"{settings.max_teacher_len} even without shots")


class RecordBuilder:
    """Builds aligned sequences for records of one source; the shot pool is indexed once (mixtures call
    :meth:`build` chunk by chunk)."""

    def __init__(self, pool: list[Record], tokenizer, settings: RecordSettings):
        self.tokenizer, self.settings = tokenizer, settings
        chats = settings.num_fewshot and any(r.kind == "chat" for r in pool)
        self.exchanges = _shot_pool(pool, settings.num_fewshot, pool[0].location) if chats else []
        self.pool_index = {question: i for i, (question, _) in enumerate(self.exchanges)}

    def build(self, records: list[Record]) -> SequenceReport:
        """Aligned sequences for ``records`` (chat: shots from the pool; text/tokens: windows)."""
        report = SequenceReport()
        stride = self.settings.window_stride or self.settings.max_seq_len
        for record in records:
            if record.kind == "chat":
                _build_chat(record, self.tokenizer, self.exchanges, self.pool_index, self.settings, report)
            else:
                _build_document(record, self.tokenizer, self.settings.max_seq_len, stride, report)
        return report


def build_record_samples(records: list[Record], pool: list[Record], tokenizer,
                         settings: RecordSettings) -> SequenceReport:
    """Aligned sequences for ``records`` (chat: shots from ``pool``; text/tokens: windows). Documents take no
    shots: ``num_fewshot`` applies to the chat records of a source only."""
    return RecordBuilder(pool, tokenizer, settings).build(records)


def with_source(report: SequenceReport, source: str) -> SequenceReport:
    """The same report with every built sample tagged with ``source``."""
    report.built = [replace(sample, source=source) for sample in report.built]
    return report
