"""Prompt construction shared by teacher caching, student training and evaluation.

The teacher sees ``num_fewshot`` worked examples before the question; the student sees only the question.
Both sequences end in the *same* answer token ids, because every sequence is built by concatenating token
id lists (prompt ids + answer ids), never by re-tokenizing a joined string. This makes the teacher/student
position mapping exact: the k-th answer token sits at ``len(student_prompt) + k`` in the student sequence and
at ``len(teacher_prompt) + k`` in the teacher sequence.

Templates
---------
With a chat template (``has_chat_template(tokenizer)``), the prompt is the conversation
``[user q1, assistant a1, ..., user qk, assistant ak, user q]`` rendered with
``apply_chat_template(add_generation_prompt=True, enable_thinking=False, tokenize=True)``. For the ChatML
template shipped with the tiny assets (Qwen style) that is::

    <|im_start|>user\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n{a1}<|im_end|>\\n ... <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n

and the answer ids are ``encode(answer, add_special_tokens=False) + end_of_turn_ids`` where the end of turn
is what the template writes right after an assistant message, with trailing whitespace dropped
(``<|im_end|>`` for ChatML; the newline the template adds after it belongs to the next turn, not to the
answer). Qwen3's own template, with ``enable_thinking=False``, appends an empty think block
``<think>\\n\\n</think>\\n\\n`` to the generation prompt; that block is part of the prompt (it is what the
model sees at inference with thinking disabled), so the answer still starts right after the prompt ids.

Without a chat template, a plain documented template is used::

    [bos]Question: {q1}\\nAnswer: {a1}\\n\\nQuestion: {q2}\\nAnswer: {a2}\\n\\n...Question: {q}\\nAnswer:

The answer then starts with a space (``" " + answer``) and ends with the eos token. ``bos`` is included only if
the tokenizer adds one on ``encode(..., add_special_tokens=True)``.

Label positions are the positions *of* the answer tokens in a sequence; the logits that predict the token at
position ``p`` are the model outputs at ``p - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PLAIN_SHOT_TEMPLATE = "Question: {question}\nAnswer: {answer}\n\n"
PLAIN_QUESTION_TEMPLATE = "Question: {question}\nAnswer:"

# Used only to locate where the template puts text around an assistant message; never appears in data.
_SENTINEL = "\u2063SENTINEL\u2063"


@dataclass(frozen=True)
class PromptPair:
    """One training/caching sample as aligned teacher and student token sequences.

    teacher_input_ids: [T_teacher] few-shot prompt + answer + end-of-turn ids.
    input_ids: [T_student] zero-shot prompt + the same answer + end-of-turn ids.
    label_positions: [A] positions of the answer tokens in ``input_ids``.
    teacher_positions: [A] positions of the same tokens in ``teacher_input_ids``.
    """

    teacher_input_ids: list[int]
    input_ids: list[int]
    label_positions: list[int]
    teacher_positions: list[int]

    @property
    def student_prompt_length(self) -> int:
        return self.label_positions[0]


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a (non-empty) chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _as_id_list(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list in transformers 4 and a BatchEncoding/dict in 5."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        if len(encoded) != 1:
            raise ValueError(f"expected one tokenized conversation, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(token_id) for token_id in encoded]


def _render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool):
    return tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=False,
        tokenize=tokenize,
        return_dict=False,
    )


def bos_prefix(tokenizer) -> list[int]:
    """[bos] if the tokenizer prepends one when adding special tokens, else [] (plain templates start with it)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return []
    with_specials = tokenizer.encode("Question", add_special_tokens=True)
    return [bos_id] if with_specials and with_specials[0] == bos_id else []


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes right after an assistant message, trailing whitespace dropped ("" if none).

    Found by rendering a one-exchange conversation and reading what follows the assistant content, up to the
    first whitespace-only remainder (e.g. "<|im_end|>" for ChatML, "<|eot_id|>" for Llama 3).
    """
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    rendered = _render_chat(tokenizer, messages, add_generation_prompt=False, tokenize=False)
    if _SENTINEL not in rendered:
        raise ValueError("the chat template does not render assistant content verbatim; cannot find its end of turn")
    return rendered.split(_SENTINEL, 1)[1].rstrip()


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that close an answer: the chat template's end of turn (:func:`end_of_turn_text`), or eos for
    the plain template (and for a chat template that writes nothing after an assistant message)."""
    if has_chat_template(tokenizer):
        suffix = end_of_turn_text(tokenizer)
        if suffix:
            return list(tokenizer.encode(suffix, add_special_tokens=False))
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a chat end-of-turn token nor an eos token; set tokenizer.eos_token")
    return [int(tokenizer.eos_token_id)]


def render_chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The whole conversation rendered by the chat template as text (no generation prompt, thinking disabled)."""
    return _render_chat(tokenizer, messages, add_generation_prompt=False, tokenize=False)


def prompt_ids(tokenizer, question: str, shots: list[tuple[str, str]]) -> list[int]:
    """Token ids up to where the answer starts (including the assistant generation prompt).

    shots: (question, answer) worked examples shown before ``question``; [] for the student.
    """
    if has_chat_template(tokenizer):
        messages: list[dict[str, str]] = []
        for shot_question, shot_answer in shots:
            messages.append({"role": "user", "content": shot_question})
            messages.append({"role": "assistant", "content": shot_answer})
        messages.append({"role": "user", "content": question})
        return _as_id_list(_render_chat(tokenizer, messages, add_generation_prompt=True, tokenize=True))
    ids = bos_prefix(tokenizer)
    shots_text = "".join(PLAIN_SHOT_TEMPLATE.format(question=q, answer=a) for q, a in shots)
    if shots_text:
        ids += tokenizer.encode(shots_text, add_special_tokens=False)
    ids += tokenizer.encode(PLAIN_QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's token ids followed by the end-of-turn ids (plain template: leading space, then eos)."""
    text = answer if has_chat_template(tokenizer) else " " + answer
    return list(tokenizer.encode(text, add_special_tokens=False)) + end_of_turn_ids(tokenizer)


def pair_from_ids(student_prompt: list[int], teacher_prompt: list[int], answer: list[int]) -> PromptPair:
    """Teacher and student sequences from prompt ids and shared answer ids, with their aligned positions."""
    input_ids = student_prompt + answer
    teacher_input_ids = teacher_prompt + answer
    label_positions = list(range(len(student_prompt), len(input_ids)))
    teacher_positions = list(range(len(teacher_prompt), len(teacher_input_ids)))
    for student_pos, teacher_pos in zip(label_positions, teacher_positions, strict=True):
        if teacher_input_ids[teacher_pos] != input_ids[student_pos]:
            raise ValueError(
                f"teacher/student answer tokens differ (teacher[{teacher_pos}]={teacher_input_ids[teacher_pos]}, "
                f"student[{student_pos}]={input_ids[student_pos]})"
            )
    return PromptPair(teacher_input_ids, input_ids, label_positions, teacher_positions)


def build_pair(tokenizer, question: str, answer: str, shots: list[tuple[str, str]]) -> PromptPair:
    """Teacher (few-shot) and student (zero-shot) sequences sharing the same answer ids, with their positions."""
    answer_token_ids = answer_ids(tokenizer, answer)
    if not answer_token_ids:
        raise ValueError(f"answer tokenizes to nothing: {answer!r}")
    student_prompt = prompt_ids(tokenizer, question, [])
    teacher_prompt = prompt_ids(tokenizer, question, shots) if shots else student_prompt
    return pair_from_ids(student_prompt, teacher_prompt, answer_token_ids)


def draw_shots(pool_size: int, num_fewshot: int, seed: int, sample_index: int, exclude: int | None) -> list[int]:
    """Deterministic distinct indices into a pool of ``pool_size`` worked examples, never ``exclude``.

    The generator is seeded from (seed, sample_index), so a sample's shots do not depend on which other samples
    are processed, in what order, or by which worker.
    """
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot == 0:
        return []
    if seed < 0 or sample_index < 0:
        raise ValueError(f"seed and sample_index must be >= 0, got seed={seed}, sample_index={sample_index}")
    excluded = exclude is not None and 0 <= exclude < pool_size
    available = pool_size - int(excluded)
    if num_fewshot > available:
        raise ValueError(
            f"num_fewshot={num_fewshot} needs at least {num_fewshot} shot candidates but the pool has {available}; "
            "lower num_fewshot or use a larger shot pool"
        )
    rng = np.random.default_rng([seed, sample_index])
    drawn = rng.choice(available, size=num_fewshot, replace=False)
    # Draw from the pool with `exclude` removed, then shift indices at or past it up by one.
    return [int(i) + 1 if excluded and i >= exclude else int(i) for i in drawn]


SHOT_SET_STREAM = 0x5E75
"""Second word of the generator seed of the shared shot sets, so they are not the per-sample draw of any index."""


@lru_cache(maxsize=8)
def draw_shot_sets(pool_size: int, num_fewshot: int, num_sets: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """``num_sets`` disjoint sets of ``num_fewshot`` pool indices, drawn once from ``seed`` (``data.fewshot_sets``).

    Disjoint, so a sample that is itself in the pool sits in at most one set and every other set is open to it;
    this needs ``num_sets * num_fewshot <= pool_size``.
    """
    if num_fewshot <= 0 or num_sets <= 0:
        raise ValueError(f"shot sets need num_fewshot > 0 and num_sets > 0, got {num_fewshot} and {num_sets}")
    if num_sets * num_fewshot > pool_size:
        raise ValueError(
            f"data.fewshot_sets={num_sets} disjoint sets of data.num_fewshot={num_fewshot} shots need "
            f"{num_sets * num_fewshot} worked examples but the shot pool has {pool_size}; lower data.fewshot_sets "
            "or data.num_fewshot, or use a larger shot pool")
    drawn = np.random.default_rng([seed, SHOT_SET_STREAM]).permutation(pool_size)[: num_sets * num_fewshot]
    return tuple(tuple(int(i) for i in drawn[m * num_fewshot:(m + 1) * num_fewshot]) for m in range(num_sets))


def assign_shot_set(shot_sets: tuple[tuple[int, ...], ...], seed: int, sample_index: int,
                    exclude: int | None) -> int:
    """The set a sample's teacher prompt uses: drawn from (seed, sample_index) among the sets without ``exclude``
    (the sample itself in the pool), so it does not depend on which other samples are processed or where."""
    open_sets = [m for m, shots in enumerate(shot_sets) if exclude not in shots]
    if not open_sets:
        raise ValueError(f"data.fewshot_sets={len(shot_sets)}: sample {sample_index} is a shot of every set; "
                         "use data.fewshot_sets >= 2")
    rng = np.random.default_rng([seed, sample_index, SHOT_SET_STREAM])
    return open_sets[int(rng.integers(len(open_sets)))]
