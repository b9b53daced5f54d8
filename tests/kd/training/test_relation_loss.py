"""The attention-relation loss (MiniLMv2 / BitDistill) against a dense loop reference, and the student's
relations as DistillStudent computes them."""

from __future__ import annotations

import math

import pytest
import torch

from kd.relations import relation_matrices
from kd.training.losses import attention_relation_loss, relation_kl


def _relations(seed: int, heads: int = 2, n: int = 5) -> torch.Tensor:
    """[3, A_r, n, n] relation softmaxes of random projections (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, 8 * heads, generator=g, dtype=torch.float64) for _ in range(3))
    return relation_matrices(q, k, v, heads)


def _reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Written out: Σ_types (1 / (A_r · n)) Σ_heads Σ_rows Σ_cols p (log p − log q), p = teacher row."""
    types, heads, n, _ = teacher.shape
    total = student.new_zeros(())
    for t in range(types):
        for a in range(heads):
            for i in range(n):
                for j in range(n):
                    p = teacher[t, a, i, j]
                    if p > 0:
                        total = total + p * (math.log(float(p)) - torch.log(student[t, a, i, j])) / (heads * n)
    return total


def test_relation_kl_is_zero_for_identical_relations_and_positive_otherwise():
    teacher = _relations(0)
    assert float(relation_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-12)
    other = _relations(1)
    assert float(relation_kl(other, teacher)) > 0.01
    torch.testing.assert_close(relation_kl(other, teacher), _reference(other, teacher), rtol=1e-10, atol=1e-12)


def test_relation_kl_gradient_matches_autograd_of_the_dense_reference():
    teacher = _relations(0)
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(relation_kl(scores.softmax(-1), teacher), scores)[0]
    reference = torch.autograd.grad(_reference(scores.softmax(-1), teacher), scores)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    # and both agree with finite differences
    assert torch.autograd.gradcheck(lambda s: relation_kl(s.softmax(-1), teacher), (scores,))


def test_teacher_rows_are_renormalized_and_zero_teacher_entries_count_zero():
    teacher = _relations(0).clone()
    teacher[..., 0] = 0.0  # an exact 0 (fp16 underflow) must not give NaN
    teacher = teacher / teacher.sum(-1, keepdim=True)
    student = _relations(2)
    expected = relation_kl(student, teacher)
    assert torch.isfinite(expected)
    torch.testing.assert_close(relation_kl(student, teacher * 1.01), expected)  # fp16 row sums 1 ± 1e-2


def test_batch_loss_weights_samples_by_their_tokens():
    small, large = (_relations(0, n=2), _relations(1, n=2)), (_relations(2, n=6), _relations(3, n=6))
    batch = attention_relation_loss([small[0], large[0]], [small[1], large[1]])
    expected = (2 * relation_kl(*small) + 6 * relation_kl(*large)) / 8
    torch.testing.assert_close(batch, expected)
    empty = torch.zeros(3, 2, 0, 0, dtype=torch.float64)
    torch.testing.assert_close(attention_relation_loss([empty, small[0]], [empty, small[1]]), relation_kl(*small))
    with pytest.raises(ValueError, match=r"\[3, A_r, n, n\]"):
        relation_kl(_relations(0, n=3), _relations(0, n=4))


def test_student_relations_are_those_of_its_q_k_v_projections_at_the_distilled_tokens():
    """DistillStudent's relations equal relation_matrices of q/k/v recomputed from the layer's input hidden
    states (another path: output_hidden_states → input_layernorm → projections) at the label positions."""
    from kd.config import StudentConfig
    from kd.student.model import DistillStudent, load_causal_lm
    from pipeline.config_loader import ASSETS_DIR

    lm = load_causal_lm(StudentConfig(model=str(ASSETS_DIR / "tiny" / "student")), torch.float32).eval()
    student = DistillStudent(lm, chunk_size=64, relation_layer=-1, relation_heads=4)
    input_ids = torch.randint(4, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    row_index = torch.tensor([0, 0, 0, 1, 1])
    label_positions = torch.tensor([5, 6, 8, 2, 9])
    topk_ids = torch.randint(0, 500, (5, 4))
    with torch.no_grad():
        gather = student(input_ids, attention_mask, row_index, label_positions, topk_ids,
                         input_ids[row_index, label_positions])
        hidden = lm(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]  # input of the last layer
        block = lm.model.layers[-1]
        normed = block.input_layernorm(hidden)
    assert [tuple(r.shape) for r in gather.relations] == [(3, 4, 3, 3), (3, 4, 2, 2)]
    for row in (0, 1):
        positions = label_positions[row_index == row]
        q, k, v = (getattr(block.self_attn, name)(normed[row, positions]) for name in ("q_proj", "k_proj", "v_proj"))
        torch.testing.assert_close(gather.relations[row], relation_matrices(q, k, v, 4), rtol=1e-5, atol=1e-6)


def test_student_relation_layer_out_of_range_is_a_user_error():
    from kd.config import StudentConfig
    from kd.errors import UserError
    from kd.student.model import DistillStudent, load_causal_lm
    from pipeline.config_loader import ASSETS_DIR

    lm = load_causal_lm(StudentConfig(model=str(ASSETS_DIR / "tiny" / "student")), torch.float32)
    with pytest.raises(UserError, match=r"student.relation_layer=5 is out of range .* 2 layers"):
        DistillStudent(lm, chunk_size=64, relation_layer=5, relation_heads=4)
    with pytest.raises(UserError, match="num_heads=3"):
        DistillStudent(lm, chunk_size=64, relation_layer=-1, relation_heads=3)
