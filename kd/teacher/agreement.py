"""Per-position agreement of two teachers' top-K scores (a cache's against a fresh re-scoring).

Two runs of one teacher differ only by kernel rounding; bf16 engines move logprobs by a few bf16 steps, and
top-K ids swap where two tokens nearly tie. The bounds of :class:`AgreementTolerances` are those the backend
agreement tests hold (tests/stages/test_cache_teacher_vllm.py: vLLM bf16 vs transformers bf16 on the tiny
teacher, measured maxima about half of them). An off-by-one alignment or another teacher moves them by far more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class AgreementTolerances:
    """What "the same teacher" allows per scored position."""

    label_atol: float = 0.15
    """nats: |Δ| of the actual token's logprob."""
    rank_atol: float = 1.0
    """nats: |Δ| of the top-K logprobs compared rank by rank."""
    prob_atol: float = 0.06
    """|Δ probability| of one token id; an id only one side keeps is compared to the other side's K-th."""
    min_top1_agreement: float = 0.95
    """Share of positions whose most likely id is the same on both sides."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class PositionAgreement:
    """Agreement of n positions: every field is [n]."""

    label_delta: np.ndarray
    rank_delta: np.ndarray
    prob_delta: np.ndarray
    top1_same: np.ndarray

    def within(self, tolerances: AgreementTolerances) -> np.ndarray:
        """[n] bool: the position agrees within every per-position tolerance."""
        return ((self.label_delta <= tolerances.label_atol) & (self.rank_delta <= tolerances.rank_atol)
                & (self.prob_delta <= tolerances.prob_atol))


def _probability_at(ids: np.ndarray, other_ids: np.ndarray, other_probs: np.ndarray) -> np.ndarray:
    """[n, K]: the other side's probability of each id in ``ids``, its K-th probability where it lacks the id
    (an upper bound of the true value there)."""
    same = ids[:, :, None] == other_ids[:, None, :]  # [n, K, K]
    found = same.any(-1)
    value = (same * other_probs[:, None, :]).sum(-1)
    return np.where(found, value, other_probs[:, -1:])


def position_agreement(ids_a: np.ndarray, logprobs_a: np.ndarray, labels_a: np.ndarray,
                       ids_b: np.ndarray, logprobs_b: np.ndarray, labels_b: np.ndarray) -> PositionAgreement:
    """Agreement of side a and side b at n positions.

    ids_*: [n, K] int, logprobs_*: [n, K] descending, labels_*: [n] logprob of the actual token.
    """
    logprobs_a, logprobs_b = logprobs_a.astype(np.float64), logprobs_b.astype(np.float64)
    probs_a, probs_b = np.exp(logprobs_a), np.exp(logprobs_b)
    prob_delta = np.maximum(np.abs(probs_a - _probability_at(ids_a, ids_b, probs_b)).max(-1, initial=0.0),
                            np.abs(probs_b - _probability_at(ids_b, ids_a, probs_a)).max(-1, initial=0.0))
    return PositionAgreement(
        label_delta=np.abs(labels_a.astype(np.float64) - labels_b.astype(np.float64)),
        rank_delta=np.abs(logprobs_a - logprobs_b).max(-1, initial=0.0),
        prob_delta=prob_delta,
        top1_same=ids_a[:, 0] == ids_b[:, 0] if ids_a.shape[1] else np.ones(len(ids_a), bool),
    )
