"""Shared types of the teacher scoring backends: requests, results, settings, errors, and the factory.

Alignment convention (the contract every backend follows)
--------------------------------------------------------
For a teacher token sequence ``teacher_input_ids`` [Tt] and a scored position ``tp`` (1 <= tp < Tt), the
distribution that PREDICTS token ``teacher_input_ids[tp]`` is the one the model computes at position ``tp - 1``
(it has seen tokens 0..tp-1). For every requested ``tp`` a backend returns

- ``topk_ids`` [n, K] int64, sorted by descending logprob;
- ``topk_logprobs`` [n, K] float32: full-vocabulary ``log_softmax`` of the fp32 logits at temperature 1;
- ``label_logprobs`` [n] float32: the logprob of the actual token ``teacher_input_ids[tp]``.

Vocabulary width: the softmax runs over the model's whole logit row, i.e. ``config.vocab_size`` rows of the
lm_head, including padded rows that no tokenizer id maps to (e.g. Qwen's 151936/152064 heads). This is what
vLLM does (``LogitsProcessor(config.vocab_size)`` only strips vLLM's own internal shard padding), so both
backends agree; ``TeacherBackend.vocab_size`` reports that width. Padded rows are trained to very low logits
in real checkpoints, so their mass is negligible, but it is kept rather than renormalized away.

Tokens after ``max(tp)`` cannot influence any requested distribution (causal attention), so backends may drop
them before the forward pass; this changes no returned value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

SUPPORTED_BACKENDS = ("vllm", "hf")
SUPPORTED_DTYPES = ("auto", "bfloat16", "float32")


class BackendUnavailableError(RuntimeError):
    """The requested backend's library cannot be imported on this machine."""


class TeacherConfigError(ValueError):
    """The teacher settings are inconsistent with the model or the engine (one-line message says what to fix)."""


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


@dataclass
class ScoreResult:
    """Scores for one request, rows in the order of ``teacher_positions``.

    topk_ids: [n, K] int64, descending logprob.
    topk_logprobs: [n, K] float32, full-vocabulary log-softmax at temperature 1.
    label_logprobs: [n] float32, logprob of teacher_input_ids[tp].
    relations: [3, A_r, n, n] float32 (Q-Q, K-K, V-V relation softmaxes over the n scored tokens) or None.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    label_logprobs: np.ndarray
    relations: np.ndarray | None = None


@dataclass
class RelationSettings:
    """Attention-relation capture (hf backend only): which layer (negative allowed) and how many heads A_r."""

    layer: int
    num_heads: int


@dataclass
class BackendSettings:
    """Plain-value settings of a teacher backend; the pipeline maps the YAML `teacher:` section onto it.

    dtype "auto": bf16 on GPU; on CPU bf16 for vllm and float32 for hf.
    max_batch_tokens / logprob_chunk: hf only (padded tokens per forward batch; rows per lm_head chunk).
    tensor_parallel_size .. max_model_len: vllm only (passed to ``vllm.LLM``).
    """

    model: str
    backend: str
    top_k: int
    dtype: str = "auto"
    device: str = "auto"
    max_batch_tokens: int = 8192
    logprob_chunk: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    relations: RelationSettings | None = None


@runtime_checkable
class TeacherBackend(Protocol):
    top_k: int
    vocab_size: int  # logit row width (the model's config.vocab_size)

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Score every request; results come back in request order."""
        ...

    def close(self) -> None:
        """Release the model / engine."""
        ...


def validate_settings(settings: BackendSettings) -> None:
    """Checks that need no model: backend name, dtype, K, batch sizes."""
    if settings.backend not in SUPPORTED_BACKENDS:
        raise TeacherConfigError(
            f"teacher.backend={settings.backend!r} is not supported; use one of {', '.join(SUPPORTED_BACKENDS)}"
        )
    if settings.dtype not in SUPPORTED_DTYPES:
        raise TeacherConfigError(
            f"teacher.dtype={settings.dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    if settings.top_k < 1:
        raise TeacherConfigError(f"teacher.top_k={settings.top_k} must be >= 1")
    if settings.max_batch_tokens < 1 or settings.logprob_chunk < 1:
        raise TeacherConfigError(
            f"teacher.max_batch_tokens={settings.max_batch_tokens} and teacher.logprob_chunk="
            f"{settings.logprob_chunk} must both be >= 1"
        )
    if settings.relations is not None and settings.backend != "hf":
        raise TeacherConfigError(
            "teacher.relations is set but vLLM returns no attention projections; use teacher.backend=hf "
            "or remove teacher.relations"
        )
    if settings.relations is not None and settings.relations.num_heads < 1:
        raise TeacherConfigError(f"teacher.relations.num_heads={settings.relations.num_heads} must be >= 1")


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


def empty_result(top_k: int, with_relations: bool, num_relation_heads: int = 0) -> ScoreResult:
    """Result for a request with no scored positions (n = 0)."""
    relations = np.zeros((3, num_relation_heads, 0, 0), np.float32) if with_relations else None
    return ScoreResult(
        topk_ids=np.zeros((0, top_k), np.int64),
        topk_logprobs=np.zeros((0, top_k), np.float32),
        label_logprobs=np.zeros((0,), np.float32),
        relations=relations,
    )


def load_backend(settings: BackendSettings) -> TeacherBackend:
    """Build the backend named by ``settings.backend``; vLLM is imported only when it is chosen."""
    validate_settings(settings)
    if settings.backend == "hf":
        from stages.teacher.hf_backend import HFTeacherBackend

        return HFTeacherBackend(settings)
    from stages.teacher.vllm_backend import VLLMTeacherBackend

    return VLLMTeacherBackend(settings)
