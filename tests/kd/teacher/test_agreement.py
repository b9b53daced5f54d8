"""position_agreement against hand-computed values: identical rows, a near-tie swap, an id only one side keeps."""

from __future__ import annotations

import numpy as np

from kd.teacher.agreement import AgreementTolerances, position_agreement


def test_identical_rows_agree_exactly():
    ids = np.array([[3, 1, 2]])
    logprobs = np.log(np.array([[0.5, 0.3, 0.1]]))
    agreement = position_agreement(ids, logprobs, np.array([-0.7]), ids, logprobs, np.array([-0.7]))
    assert agreement.label_delta[0] == 0 and agreement.rank_delta[0] == 0 and agreement.prob_delta[0] == 0
    assert agreement.within(AgreementTolerances()).all() and agreement.top1_same.all()


def test_a_near_tie_swap_and_an_id_only_one_side_keeps():
    # a: ids 3, 1, 2 with p .50 .30 .10; b: 3 and 1 swap near a tie, and b keeps 7 (p .11) instead of 2 (p .10)
    ids_a, probs_a = np.array([[3, 1, 2]]), np.array([[0.50, 0.30, 0.10]])
    ids_b, probs_b = np.array([[1, 3, 7]]), np.array([[0.41, 0.40, 0.11]])
    agreement = position_agreement(ids_a, np.log(probs_a), np.array([-1.0]),
                                   ids_b, np.log(probs_b), np.array([-1.2]))
    np.testing.assert_allclose(agreement.label_delta, [0.2])
    np.testing.assert_allclose(agreement.rank_delta, [np.log(0.40 / 0.30)])  # the largest: rank 2, .30 vs .40
    # id 1: |.30 - .41| = .11 (the largest); id 3: .10; id 2 vs b's K-th .11: .01; id 7 vs a's K-th .10: .01
    np.testing.assert_allclose(agreement.prob_delta, [0.11])
    assert not agreement.top1_same[0]
    assert not agreement.within(AgreementTolerances()).any()
    assert agreement.within(AgreementTolerances(label_atol=0.25, prob_atol=0.12)).all()
