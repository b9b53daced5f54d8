"""Chat records as token segments: the rendered conversation, with the assistant turns marked for distillation.

The conversation is rendered with the tokenizer's chat template (Qwen3 thinking disabled) with every
assistant message replaced by a sentinel; the text between sentinels is tokenized as is, and each assistant
message becomes ``encode(content) + end_of_turn_ids`` — the same convention as GSM8K answers
(:mod:`kd.data.prompting`), so under a chat template a one-exchange chat gives exactly the ids of a GSM8K
row. **Every assistant turn is distilled** (its content and its end of turn), nothing else; turns after the last assistant turn are dropped
(nothing to predict there). Without a chat template the documented plain chat template is used::

    [bos]System: {system}\\nUser: {u1}\\nAssistant: {a1}[eos]\\nUser: {u2}\\nAssistant: {a2}[eos]

where `` {a}[eos]`` (leading space included) is distilled.

Teacher context. The student sees the conversation (with ``data.system_prompt`` as its system message when
the row has none). The teacher additionally sees ``data.teacher_system_prompt`` (the *privileged teacher
context*: instructions the student must learn to follow without seeing them; merged in front of the row's
own system message) and ``num_fewshot`` worked exchanges drawn from one-exchange records of the shot pool,
placed after the system message. Shots are dropped from the end until the teacher sequence fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd.data.formats import Record
from kd.data.prompting import (
    PromptPair,
    bos_prefix,
    end_of_turn_ids,
    end_of_turn_text,
    has_chat_template,
    render_chat_text,
)

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
