"""Shared types of the teacher scoring backends: requests, results, the backend protocol and request checks.

Alignment convention (the contract every backend follows)
--------------------------------------------------------
For a teacher token sequence ``teacher_input_ids`` [Tt] and a scored position ``tp`` (1 <= tp < Tt), the
distribution that PREDICTS token ``teacher_input_ids[tp]`` is the one the model computes at position ``tp - 1``
(it has seen tokens 0..tp-1). For every requested ``tp`` a backend returns

- ``topk_ids`` [n, K] int64, sorted by descending logprob;
- ``topk_logprobs`` [n, K] float32: full-vocabulary ``log_softmax`` of the fp32 logits at temperature 1;
- ``label_logprobs`` [n] float32: the logprob of the actual token ``teacher_input_ids[tp]``;
- ``log_normalizers`` [n, M] float32 when ``score`` is asked for M temperatures τ_m (backends that see the
  full logit row): log Σ_V p_v^(1/τ_m) of that same τ=1 distribution, which makes tempering exact;
- ``sampled_ids`` / ``sampled_counts`` [n, S] int64 when ``score`` is given a :class:`SamplingSpec` (backends
  that see the full logit row): S draws from the teacher's softmax at the spec's τ, as unique ids + counts,
  deterministic from (seed, ``ScoreRequest.sample_key``, tp).

Vocabulary width: the softmax runs over the model's whole logit row, i.e. ``config.vocab_size`` rows of the
lm_head, including padded rows that no tokenizer id maps to (e.g. Qwen's 151936/152064 heads). This is what
vLLM does (``LogitsProcessor(config.vocab_size)`` only strips vLLM's own internal shard padding), so both
backends agree; ``TeacherBackend.vocab_size`` reports that width. Padded rows are trained to very low logits
in real checkpoints, so their mass is negligible, but it is kept rather than renormalized away.

Tokens after ``max(tp)`` cannot influence any requested distribution (causal attention), so backends may drop
them before the forward pass; this changes no returned value.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from kd.errors import TeacherConfigError

TEACHER_DTYPES = ("auto", "bfloat16", "float32")
"""``teacher.dtype``: ``auto`` is bf16 on GPU; on CPU bf16 for vllm (its fast kernels) and fp32 for hf."""
LOGPROB_MODES = ("raw_logprobs",)
"""``teacher.logprob_mode``: the full-vocabulary log-softmax of the raw fp32 logits at temperature 1."""


class ScoreRequestError(ValueError):
    """A score request is malformed (positions out of range, token ids outside the vocabulary, too long)."""


@dataclass
class ScoreRequest:
    """One teacher sequence and the positions whose tokens are scored.

    teacher_input_ids: [Tt] token ids of the full teacher sequence (prompt + answer).
    teacher_positions: [n] int positions tp (1 <= tp < Tt) of the tokens to predict; any order, may be empty.
    """

    teacher_input_ids: list[int] | np.ndarray
    teacher_positions: np.ndarray
    sample_key: int = 0
    """A stable key of the sample (stage one: crc32 of its id): with the position it fixes the sampled draws."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampled targets to draw: ``draws`` (S) tokens per scored position from the teacher at ``temperature``."""

    draws: int
    temperature: float
    seed: int
    keep_topk: bool = True
    """False: the cache stores the sampled targets only (stage one drops the top-K rows it gets back)."""


@dataclass
class ScoreResult:
    """Scores for one request, rows in the order of ``teacher_positions``.

    topk_ids: [n, K] int64, descending logprob.
    topk_logprobs: [n, K] float32, full-vocabulary log-softmax at temperature 1.
    label_logprobs: [n] float32, logprob of teacher_input_ids[tp].
    relations: [3, A_r, n, n] float32 (Q-Q, K-K, V-V relation softmaxes over the n scored tokens) or None.
    log_normalizers: [n, M] float32, log Σ_V p^(1/τ_m) for the M temperatures asked of ``score``, or None.
    sampled_ids, sampled_counts: [n, S] int64 unique drawn ids (ascending, then padding) and their counts, or None.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    label_logprobs: np.ndarray
    relations: np.ndarray | None = None
    log_normalizers: np.ndarray | None = None
    sampled_ids: np.ndarray | None = None
    sampled_counts: np.ndarray | None = None


@runtime_checkable
class TeacherBackend(Protocol):
    top_k: int
    vocab_size: int  # logit row width (the model's config.vocab_size)

    def score(self, requests: list[ScoreRequest], temperatures: Sequence[float] = ()) -> list[ScoreResult]:
        """Score every request; results come back in request order. ``temperatures`` (none equal to 1): also
        return each position's log-normalizer at each; a backend that cannot raises TeacherConfigError."""
        ...

    def close(self) -> None:
        """Release the model / engine."""
        ...


def check_top_k_fits(top_k: int, vocab_size: int, model: str) -> None:
    if top_k > vocab_size:
        raise TeacherConfigError(
            f"teacher.top_k={top_k} exceeds the vocabulary of {model} ({vocab_size} logits); lower teacher.top_k"
        )


def checked_request_arrays(
    request: ScoreRequest, index: int, vocab_size: int, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one request; return (ids [Tt] int64, positions [n] int64).

    Raises ScoreRequestError naming the request index when positions fall outside 1..Tt-1, ids fall outside
    the vocabulary, or the sequence needed for the positions is longer than `max_len`.
    """
    ids = np.asarray(request.teacher_input_ids, dtype=np.int64).reshape(-1)
    positions = np.asarray(request.teacher_positions)
    if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
        raise ScoreRequestError(
            f"request {index}: teacher_positions must be a 1-D integer array, got shape {positions.shape} "
            f"dtype {positions.dtype}"
        )
    positions = positions.astype(np.int64)
    if positions.size and (positions.min() < 1 or positions.max() >= ids.size):
        raise ScoreRequestError(
            f"request {index}: teacher_positions must lie in [1, {ids.size - 1}] for a sequence of {ids.size} "
            f"tokens, got min {positions.min()} max {positions.max()}"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ScoreRequestError(
            f"request {index}: token ids must lie in [0, {vocab_size}), got min {ids.min()} max {ids.max()}; "
            "was the sample tokenized with the teacher's tokenizer?"
        )
    if max_len is not None and positions.size and positions.max() + 1 > max_len:
        raise ScoreRequestError(
            f"request {index}: scoring position {positions.max()} needs {positions.max() + 1} tokens but the "
            f"teacher accepts at most {max_len}; shorten the sample or raise the model length limit"
        )
    return ids, positions


def empty_result(top_k: int, with_relations: bool, num_relation_heads: int = 0,
                 num_temperatures: int = 0, draws: int = 0) -> ScoreResult:
    """Result for a request with no scored positions (n = 0); ``draws`` > 0: with empty sampled targets."""
    relations = np.zeros((3, num_relation_heads, 0, 0), np.float32) if with_relations else None
    return ScoreResult(
        topk_ids=np.zeros((0, top_k), np.int64),
        topk_logprobs=np.zeros((0, top_k), np.float32),
        label_logprobs=np.zeros((0,), np.float32),
        relations=relations,
        log_normalizers=np.zeros((0, num_temperatures), np.float32) if num_temperatures else None,
        sampled_ids=np.zeros((0, draws), np.int64) if draws else None,
        sampled_counts=np.zeros((0, draws), np.int64) if draws else None,
    )


def check_no_temperatures(temperatures: Sequence[float], backend: str) -> None:
    """For backends that only see top-K logprobs at τ=1: refuse a request for log-normalizers."""
    if len(temperatures):
        raise TeacherConfigError(
            f"teacher.backend={backend} returns top-K logprobs at τ=1 only and cannot give the log-normalizer at "
            f"τ={', '.join(f'{t:g}' for t in temperatures)}; use teacher.backend=hf or cache.temperatures=[1.0]")
