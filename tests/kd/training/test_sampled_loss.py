"""The sampled-target loss against a dense reference: exact when fed the exact distribution, and its mean over
many independent draws equals the dense full-vocabulary cross-entropy (hence the forward KL up to a constant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.teacher.logit_rows import sampling_uniforms, unique_counts
from kd.training.losses import (
    StudentGather,
    sampled_cross_entropy,
    sampled_distillation_loss,
    student_logprobs_at,
)

V, N = 12, 5


def _dense(seed: int = 0, tau: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(N, V, generator=generator, dtype=torch.float64) * 2 / tau, dim=-1)
    student = torch.log_softmax(torch.randn(N, V, generator=generator, dtype=torch.float64) / tau, dim=-1)
    return teacher, student


def test_exact_when_fed_the_exact_distribution():
    teacher, student = _dense()
    dense_ce = -(teacher.exp() * student).sum(-1)  # [N] H(p, q)
    dense_kl = (teacher.exp() * (teacher - student)).sum(-1)
    got = sampled_cross_entropy(student, teacher.exp())
    torch.testing.assert_close(got, dense_ce)
    entropy = -(teacher.exp() * teacher).sum(-1)
    torch.testing.assert_close(got - entropy, dense_kl)  # forward KL up to the teacher's entropy


def test_mean_over_draws_equals_the_dense_cross_entropy():
    teacher, student = _dense(seed=1)
    draws, trials = 16, 4000
    # trials x N rows of S draws each, from the teacher by inverse CDF on the project's uniforms
    uniforms = sampling_uniforms(7, np.repeat(np.arange(trials), N), np.tile(np.arange(N), trials), draws)
    cdf = np.cumsum(teacher.exp().numpy(), axis=1)  # [N, V]
    rows = np.tile(np.arange(N), trials)
    drawn = np.minimum((uniforms[..., None] * cdf[rows, -1][:, None, None] >= cdf[rows][:, None, :]).sum(-1), V - 1)
    ids, counts = unique_counts(drawn)  # [trials·N, S]
    assert np.all(counts.sum(1) == draws) and (counts > 0).sum(1).mean() < draws
    gathered = torch.gather(student[torch.as_tensor(rows)], 1, torch.as_tensor(ids))
    estimates = sampled_cross_entropy(gathered, torch.as_tensor(counts / draws)).reshape(trials, N)
    dense_ce = -(teacher.exp() * student).sum(-1)
    standard_error = estimates.std(0) / trials ** 0.5
    assert torch.all((estimates.mean(0) - dense_ce).abs() < 4 * standard_error + 1e-9)


def test_distillation_loss_uses_count_over_s_and_ignores_padding():
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(4, V, bias=False).double()
    ids = torch.tensor([[1, 5, 5], [2, 2, 2], [0, 3, 9]])
    counts = torch.tensor([[2, 1, 0], [3, 0, 0], [1, 1, 1]])
    gather = student_logprobs_at(hidden, head, ids, torch.tensor([1, 2, 3]), temperature=2.0)
    parts = sampled_distillation_loss(gather, counts, temperature=2.0, temperature_squared=True, ce_weight=0.5)
    logq = torch.log_softmax(head(hidden) / 2, dim=-1)
    want = -(2 / 3 * logq[0, 1] + 1 / 3 * logq[0, 5] + logq[1, 2] + (logq[2, 0] + logq[2, 3] + logq[2, 9]) / 3) / 3 * 4
    torch.testing.assert_close(parts.kd, want)
    parts.total.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        sampled_distillation_loss(StudentGather(logq[:, :3], logq[:, 0], logq[:, :3], 1.0), counts, temperature=2.0)
