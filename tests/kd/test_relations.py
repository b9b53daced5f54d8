"""relation_matrices vs a naive loop, the hf hook path, and relation setting errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.errors import TeacherConfigError
from kd.relations import relation_matrices
from kd.teacher.types import ScoreRequest
from tests.helpers.tiny_teacher import load_teacher, random_requests, relations_at


def naive_relations(projections: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Per type, per head, per (i, j) pair: exp(a_i·a_j / √d) normalized over j — written as plain loops."""
    n = projections[0].shape[0]
    out = torch.zeros(3, num_heads, n, n, dtype=torch.float64)
    for j, projection in enumerate(projections):
        d = projection.shape[1] // num_heads
        for h in range(num_heads):
            heads = projection[:, h * d : (h + 1) * d].double()
            for row in range(n):
                scores = [float(heads[row] @ heads[col]) / math.sqrt(d) for col in range(n)]
                peak = max(scores)
                weights = [math.exp(s - peak) for s in scores]
                out[j, h, row] = torch.tensor(weights) / sum(weights)
    return out


def test_relation_matrices_match_naive_loop():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 64), torch.randn(7, 32), torch.randn(7, 48)  # widths differ (GQA-like)
    result = relation_matrices(q, k, v, num_heads=4)
    assert result.shape == (3, 4, 7, 7)
    torch.testing.assert_close(result.double(), naive_relations([q, k, v], 4), atol=1e-6, rtol=1e-5)


def test_relation_matrices_are_differentiable():
    q = torch.randn(5, 16, requires_grad=True)
    k, v = torch.randn(5, 16), torch.randn(5, 16)
    target = torch.softmax(torch.randn(3, 2, 5, 5), -1)
    loss = (target * relation_matrices(q, k, v, num_heads=2).log()).sum()
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_relation_matrices_reject_indivisible_width():
    with pytest.raises(TeacherConfigError, match="relations.num_heads=3 does not divide the q_proj width 16"):
        relation_matrices(torch.randn(4, 16), torch.randn(4, 15), torch.randn(4, 15), num_heads=3)


def test_hf_backend_relations_from_hooks(tiny_teacher_dir):
    backend = load_teacher(tiny_teacher_dir, "hf", top_k=8, device="cpu", relations=relations_at(-1, 4))
    requests = random_requests(3, seed=5)
    results = backend.score(requests)
    backend.close()

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    attention = model.model.layers[-1].self_attn
    for request, result in zip(requests, results):
        n = len(request.teacher_positions)
        assert result.relations.shape == (3, 4, n, n) and result.relations.dtype == np.float32
        np.testing.assert_allclose(result.relations.sum(-1), 1.0, atol=1e-5)
        # reference: capture the projections of the answer tokens (positions tp, not tp - 1) by hand
        captured = {}
        hooks = [
            getattr(attention, name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
            for name in ("q_proj", "k_proj", "v_proj")
        ]
        with torch.inference_mode():
            model(input_ids=torch.tensor(request.teacher_input_ids)[None])
        for hook in hooks:
            hook.remove()
        positions = torch.as_tensor(request.teacher_positions)
        expected = relation_matrices(*(captured[name][0, positions] for name in ("q_proj", "k_proj", "v_proj")), 4)
        np.testing.assert_allclose(result.relations, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("relations", "message"),
    [
        (relations_at(2, 4), r"teacher.relations.layer=2 is out of range .* 2 layers"),
        (relations_at(-3, 4), r"teacher.relations.layer=-3 is out of range"),
        (relations_at(0, 3), "teacher.relations.num_heads=3 does not divide the q_proj width 128"),
    ],
)
def test_bad_relation_settings_raise(tiny_teacher_dir, relations, message):
    # relations.num_heads < 1 is refused by config validation (tests/pipeline/test_config.py).
    with pytest.raises(TeacherConfigError, match=message):
        load_teacher(tiny_teacher_dir, "hf", top_k=4, device="cpu", relations=relations)


def test_relations_with_vllm_raise_before_import(tiny_teacher_dir):
    with pytest.raises(TeacherConfigError, match="teacher.relations is set but vLLM returns no attention"):
        load_teacher(tiny_teacher_dir, "vllm", top_k=4, relations=relations_at(-1, 4))


def test_relations_with_empty_positions(tiny_teacher_dir):
    backend = load_teacher(tiny_teacher_dir, "hf", top_k=4, device="cpu", relations=relations_at(0, 2))
    result = backend.score([ScoreRequest([5, 6, 7], np.array([], dtype=np.int64))])[0]
    assert result.relations.shape == (3, 2, 0, 0)
