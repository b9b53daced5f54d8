"""The online-distillation collator and logit gather: the few-shot teacher is read at the same answer tokens."""

import torch

from kd.training.online_gkd import AnswerCollator, _logits_before

FEATURES = [
    {"input_ids": [5, 6, 7, 8], "label_positions": [2, 3], "teacher_input_ids": [9, 9, 9, 5, 6, 7, 8],
     "teacher_positions": [5, 6]},
    {"input_ids": [5, 6, 7], "label_positions": [1, 2], "teacher_input_ids": [9, 5, 6, 7], "teacher_positions": [2, 3]},
]


def test_collator_pads_both_sides_and_aligns_answer_positions():
    batch = AnswerCollator(pad_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 6, 7, -100]]
    assert batch["teacher_input_ids"].shape == (2, 7) and batch["teacher_attention_mask"][1].tolist() == [1] * 4 + [0] * 3
    assert batch["student_answer_positions"].tolist() == [[2, 3], [1, 2]]
    assert batch["teacher_answer_positions"].tolist() == [[5, 6], [2, 3]]
    assert batch["answer_labels"].tolist() == [[7, 8], [6, 7]]
    for row in range(2):  # the same tokens sit at the answer positions of both sequences
        student = batch["input_ids"][row, batch["student_answer_positions"][row]]
        teacher = batch["teacher_input_ids"][row, batch["teacher_answer_positions"][row]]
        assert torch.equal(student, teacher)


def test_collator_without_teacher_sequences_is_trl_s_plain_input():
    batch = AnswerCollator(pad_id=0)([{k: f[k] for k in ("input_ids", "label_positions")} for f in FEATURES])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_logits_before_reads_the_outputs_one_position_earlier():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # [B, T, V]
    gathered = _logits_before(logits, torch.tensor([[2, 4], [1, 1]]))  # [B, A, V]
    assert torch.equal(gathered[0, 0], logits[0, 1]) and torch.equal(gathered[0, 1], logits[0, 3])
    assert torch.equal(gathered[1, 0], logits[1, 0])
