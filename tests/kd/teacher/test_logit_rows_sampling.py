"""Sampled targets from full logit rows: deterministic from (seed, key, position), independent of chunking,
unique ids ascending with counts summing to S, and unbiased (count/S tends to the tempered teacher)."""

from __future__ import annotations

import numpy as np
import torch

from kd.teacher.logit_rows import LogitHead, RowSampling, targets_from_hidden_rows, unique_counts


def _rows(seed: int = 0, vocab: int = 40):
    torch.manual_seed(seed)
    head = LogitHead(torch.nn.Linear(6, vocab, bias=False))
    return torch.randn(7, 6), torch.arange(7) % vocab, head


def test_draws_are_deterministic_and_independent_of_chunking():
    hidden, labels, head = _rows()
    spec = RowSampling(32, 2.0, seed=3, row_keys=np.array([9] * 4 + [11] * 3), row_positions=np.arange(7) + 1)
    one = targets_from_hidden_rows(hidden, labels, head, 4, chunk=256, sampling=spec)
    two = targets_from_hidden_rows(hidden, labels, head, 4, chunk=2, sampling=spec)
    np.testing.assert_array_equal(one.sampled_ids, two.sampled_ids)
    np.testing.assert_array_equal(one.sampled_counts, two.sampled_counts)
    assert np.all(one.sampled_counts.sum(1) == 32)
    counted = one.sampled_counts > 0
    assert np.all(np.diff(one.sampled_ids, axis=1)[counted[:, 1:]] > 0)  # unique ids ascending first
    other = targets_from_hidden_rows(hidden, labels, head, 4, sampling=RowSampling(32, 2.0, 4, spec.row_keys,
                                                                                   spec.row_positions))
    assert not np.array_equal(other.sampled_ids, one.sampled_ids)  # another seed, other draws


def test_counts_over_s_estimate_the_tempered_teacher():
    hidden, labels, head = _rows(seed=1, vocab=20)
    spec = RowSampling(20_000, 2.0, seed=0, row_keys=np.zeros(7), row_positions=np.arange(7))
    got = targets_from_hidden_rows(hidden, labels, head, 4, sampling=spec)
    with torch.no_grad():
        want = torch.softmax(head(hidden) / 2.0, dim=-1).numpy()  # [7, V]
    estimate = np.zeros_like(want)
    np.add.at(estimate, (np.arange(7)[:, None].repeat(spec.draws, 1), got.sampled_ids), got.sampled_counts / spec.draws)
    assert np.abs(estimate - want).max() < 0.015


def test_unique_counts_pads_with_the_last_id():
    ids, counts = unique_counts(np.array([[4, 1, 4, 4], [7, 7, 7, 7]]))
    np.testing.assert_array_equal(ids, [[1, 4, 4, 4], [7, 7, 7, 7]])
    np.testing.assert_array_equal(counts, [[1, 3, 0, 0], [4, 0, 0, 0]])
