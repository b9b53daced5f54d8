"""Alignment invariants of kd.data.prompting on a freshly trained tiny tokenizer (no shipped files needed)."""

import copy

import pytest
from tokenizers import processors

from kd.data.prompting import (
    PLAIN_QUESTION_TEMPLATE,
    PLAIN_SHOT_TEMPLATE,
    answer_ids,
    build_pair,
    draw_shots,
    end_of_turn_ids,
    has_chat_template,
    prompt_ids,
)
from pipeline.assets.scale.real_tokenizer import QWEN3_CHAT_TEMPLATE
from pipeline.assets.synthetic_task import generate_rows
from pipeline.assets.tiny_tokenizer import IM_END, IM_START, task_texts, train_tokenizer

# Qwen3's template as far as it matters here (the empty think block with thinking disabled): the scale assets'.
QWEN3_LIKE_TEMPLATE = QWEN3_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def rows():
    return generate_rows(60, seed=7)


@pytest.fixture(scope="module")
def chat_tokenizer(rows):
    return train_tokenizer(task_texts(rows) + ["<think>\n\n</think>\n\n"], vocab_size=400)


@pytest.fixture(scope="module")
def plain_tokenizer(chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


def _shots(rows, indices):
    return [(rows[i]["question"], rows[i]["answer"]) for i in indices]


def test_chat_pair_shares_answer_tail_and_positions(chat_tokenizer, rows):
    row = rows[0]
    pair = build_pair(chat_tokenizer, row["question"], row["answer"], _shots(rows, [3, 4, 5]))
    expected_answer = chat_tokenizer.encode(row["answer"], add_special_tokens=False) + [
        chat_tokenizer.convert_tokens_to_ids(IM_END)
    ]
    answer_length = len(expected_answer)
    assert pair.input_ids[-answer_length:] == expected_answer
    assert pair.teacher_input_ids[-answer_length:] == expected_answer
    assert pair.label_positions == list(range(len(pair.input_ids) - answer_length, len(pair.input_ids)))
    assert pair.teacher_positions == list(
        range(len(pair.teacher_input_ids) - answer_length, len(pair.teacher_input_ids))
    )
    assert [pair.input_ids[p] for p in pair.label_positions] == [
        pair.teacher_input_ids[p] for p in pair.teacher_positions
    ]
    assert len(pair.teacher_input_ids) > len(pair.input_ids) + 50  # three shots really are in the teacher prompt
    # The student prompt ends with the generation prompt "<|im_start|>assistant\n".
    student_prompt_text = chat_tokenizer.decode(pair.input_ids[: pair.student_prompt_length])
    assert student_prompt_text.endswith(f"{IM_START}assistant\n")
    assert pair.student_prompt_length == len(prompt_ids(chat_tokenizer, row["question"], []))


def test_chat_student_ids_equal_tokenized_full_conversation(chat_tokenizer, rows):
    # Training text and inference text must agree: prompt + answer ids == tokenizing the whole rendered chat
    # (the template's newline after <|im_end|> belongs to the next turn and is the only extra token).
    for row in rows[:20]:
        pair = build_pair(chat_tokenizer, row["question"], row["answer"], [])
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        rendered = chat_tokenizer.apply_chat_template(messages, tokenize=False)
        full_ids = chat_tokenizer.encode(rendered, add_special_tokens=False)
        assert full_ids[: len(pair.input_ids)] == pair.input_ids
        assert chat_tokenizer.decode(full_ids[len(pair.input_ids) :]) == "\n"


def test_teacher_prompt_with_shots_equals_rendered_conversation(chat_tokenizer, rows):
    shots = _shots(rows, [10, 11])
    ids = prompt_ids(chat_tokenizer, rows[1]["question"], shots)
    text = chat_tokenizer.decode(ids)
    expected = "".join(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n" for q, a in shots)
    expected += f"{IM_START}user\n{rows[1]['question']}{IM_END}\n{IM_START}assistant\n"
    assert text == expected


def test_zero_shots_teacher_equals_student(chat_tokenizer, plain_tokenizer, rows):
    for tokenizer in (chat_tokenizer, plain_tokenizer):
        pair = build_pair(tokenizer, rows[2]["question"], rows[2]["answer"], [])
        assert pair.teacher_input_ids == pair.input_ids
        assert pair.teacher_positions == pair.label_positions


def test_end_of_turn_is_im_end_for_chatml(chat_tokenizer):
    assert has_chat_template(chat_tokenizer)
    assert end_of_turn_ids(chat_tokenizer) == [chat_tokenizer.convert_tokens_to_ids(IM_END)]


def test_plain_template_path(plain_tokenizer, rows):
    assert not has_chat_template(plain_tokenizer)
    row, shots = rows[0], _shots(rows, [1, 2])
    pair = build_pair(plain_tokenizer, row["question"], row["answer"], shots)
    teacher_text = plain_tokenizer.decode(pair.teacher_input_ids)
    expected = "".join(PLAIN_SHOT_TEMPLATE.format(question=q, answer=a) for q, a in shots)
    expected += PLAIN_QUESTION_TEMPLATE.format(question=row["question"]) + " " + row["answer"] + "<|endoftext|>"
    assert teacher_text == expected
    assert pair.input_ids[-1] == plain_tokenizer.eos_token_id
    answer_text = plain_tokenizer.decode([pair.input_ids[p] for p in pair.label_positions])
    assert answer_text == " " + row["answer"] + "<|endoftext|>"
    assert answer_ids(plain_tokenizer, row["answer"]) == pair.input_ids[pair.student_prompt_length :]


def test_plain_template_includes_bos_when_tokenizer_adds_one(plain_tokenizer, rows):
    tokenizer = copy.deepcopy(plain_tokenizer)
    backend = tokenizer.backend_tokenizer
    bos_id = backend.token_to_id(IM_START)  # stand-in bos: any special token works for the invariant
    backend.post_processor = processors.TemplateProcessing(
        single=f"{IM_START} $A", special_tokens=[(IM_START, bos_id)]
    )
    tokenizer.bos_token = IM_START
    pair = build_pair(tokenizer, rows[0]["question"], rows[0]["answer"], _shots(rows, [5]))
    assert pair.input_ids[0] == bos_id and pair.teacher_input_ids[0] == bos_id
    assert pair.input_ids.count(bos_id) == 1 and pair.teacher_input_ids.count(bos_id) == 1


def test_qwen3_style_empty_think_block_is_part_of_prompt(chat_tokenizer, rows):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    pair = build_pair(tokenizer, rows[0]["question"], rows[0]["answer"], _shots(rows, [1]))
    prompt_text = tokenizer.decode(pair.input_ids[: pair.student_prompt_length])
    assert prompt_text.endswith(f"{IM_START}assistant\n<think>\n\n</think>\n\n")
    answer_text = tokenizer.decode([pair.input_ids[p] for p in pair.label_positions])
    assert answer_text == rows[0]["answer"] + IM_END
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(IM_END)]


def test_draw_shots_deterministic_distinct_and_excludes_sample():
    first = [draw_shots(50, 3, seed=11, sample_index=i, exclude=i) for i in range(50)]
    second = [draw_shots(50, 3, seed=11, sample_index=i, exclude=i) for i in range(50)]
    assert first == second
    for sample_index, shots in enumerate(first):
        assert len(shots) == 3 and len(set(shots)) == 3
        assert sample_index not in shots
        assert all(0 <= s < 50 for s in shots)
    assert first != [draw_shots(50, 3, seed=12, sample_index=i, exclude=i) for i in range(50)]
    # Independent of processing order: a sample's shots depend only on (seed, sample_index).
    assert draw_shots(50, 3, seed=11, sample_index=17, exclude=17) == first[17]


def test_draw_shots_small_pool_edges():
    # A pool of 4 with one excluded leaves exactly 3 candidates: all of them must be drawn.
    assert sorted(draw_shots(4, 3, seed=0, sample_index=0, exclude=2)) == [0, 1, 3]
    assert draw_shots(10, 0, seed=0, sample_index=3, exclude=3) == []
    # An exclude outside the pool (e.g. a test-split sample) removes nothing.
    assert sorted(draw_shots(3, 3, seed=5, sample_index=1, exclude=None)) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_fewshot=3"):
        draw_shots(3, 3, seed=0, sample_index=0, exclude=1)
    with pytest.raises(ValueError, match="num_fewshot must be >= 0"):
        draw_shots(3, -1, seed=0, sample_index=0, exclude=None)


def test_shot_sets_are_drawn_once_disjoint_and_deterministic():
    from kd.data.prompting import draw_shot_sets

    sets = draw_shot_sets(40, 3, 8, seed=5)
    assert sets == draw_shot_sets(40, 3, 8, seed=5) and sets != draw_shot_sets(40, 3, 8, seed=6)
    assert len(sets) == 8 and all(len(s) == 3 for s in sets)
    flat = [i for s in sets for i in s]
    assert len(set(flat)) == 24 and all(0 <= i < 40 for i in flat)
    with pytest.raises(ValueError, match=r"data.fewshot_sets=14 disjoint sets of data.num_fewshot=3 shots need 42"):
        draw_shot_sets(40, 3, 14, seed=5)


def test_assigned_shot_set_never_holds_the_sample_and_depends_only_on_seed_and_index():
    from kd.data.prompting import assign_shot_set, draw_shot_sets

    sets = draw_shot_sets(40, 3, 4, seed=1)
    for index in range(40):
        chosen = assign_shot_set(sets, 1, index, exclude=index)
        assert index not in sets[chosen]
        assert chosen == assign_shot_set(sets, 1, index, exclude=index)
    assert len({assign_shot_set(sets, 1, index, None) for index in range(40)}) == 4  # all sets get used
    with pytest.raises(ValueError, match="is a shot of every set; use data.fewshot_sets >= 2"):
        assign_shot_set(sets[:1], 1, 0, exclude=sets[0][0])
