"""Which cache samples stage two trains on and which it holds out, and whether a cache fits the student.

:func:`open_training_cache` opens the cache a config names (one line on failure); :func:`split_indices` makes
the seeded hold-out every process and every world size agree on; :func:`source_sample_weights` turns
``train.source_weights`` into per-sample drawing weights; :func:`check_student_compatible` refuses a cache
whose ids the student cannot embed; :func:`normalizer_column` finds the teacher log-normalizers a tail-tempered
loss needs, or refuses a cache that lacks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cache_schema import CacheDamagedError, CacheError, CacheMismatchError, open_cache, validate_cache
from kd.errors import UserError
from kd.training.losses import needs_log_normalizer

_SPLIT_SALT = 0x5D17  # keeps the validation draw independent of the epoch-0 training permutation ([seed, 0])


class CacheMismatch(CacheMismatchError):
    """The cache cannot train this student (other tokenizer, ids beyond its embedding). A ValueError."""


def open_training_cache(path: str):
    """The complete cache at ``cache.path`` (shallow-validated), or a one-line UserError saying what to do."""
    try:
        cache = open_cache(path)
        validate_cache(cache, deep=False)
    except CacheDamagedError as exc:  # its message already says how to rebuild only the damaged part
        raise UserError(f"cache.path: {str(exc).splitlines()[0]}") from None
    except CacheError as exc:
        raise UserError(f"cache.path: {str(exc).splitlines()[0]}; stage two needs the complete cache that "
                        "`pipeline cache-teacher` writes for this config") from None
    return cache


def split_indices(num_samples: int, num_validation: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, validation_indices), both sorted int64: a seeded hold-out of `num_validation` samples.

    Depends only on (num_samples, num_validation, seed), so every rank and every world size holds out the
    same samples.
    """
    if not 0 <= num_validation < num_samples:
        raise ValueError(f"num_validation must be in [0, {num_samples}) for a cache of {num_samples} samples, "
                         f"got {num_validation}")
    permutation = np.random.default_rng([seed, _SPLIT_SALT]).permutation(num_samples)
    return np.sort(permutation[num_validation:]).astype(np.int64), np.sort(permutation[:num_validation]).astype(np.int64)


def source_sample_weights(cache: Any, indices: Sequence[int], source_weights: dict[str, float]) -> np.ndarray:
    """[M] sampling weight of each of `indices`: its source's entry in `source_weights` (unlisted: 1).

    ValueError for a cache that records no sources, a name the cache does not have, or weights that leave
    nothing to draw.
    """
    if not getattr(cache, "has_sources", False):
        raise ValueError(f"cache {cache.path} records no per-sample source (format version 1, or written "
                         "without sources); re-run stage one to reweight sources")
    unknown = sorted(set(source_weights) - set(cache.source_names))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; the cache has {cache.source_names}")
    per_sample = np.array([float(source_weights.get(cache.sample_sources[int(i)], 1.0)) for i in indices])
    if not per_sample.size or per_sample.sum() <= 0:
        raise ValueError("every training sample has weight 0; give at least one source a weight > 0")
    return per_sample


def check_student_compatible(cache: Any, student_tokenizer_fingerprint: str, student_embedding_rows: int) -> None:
    """Raise CacheMismatch unless the student shares the cache's tokenizer and can embed every cached id.

    The cache's index records the largest id among the student inputs and the teacher's top-K
    (``max_token_id``); the student must embed it. Embedding matrices padded differently from the teacher's
    (Qwen2.5 7B: 152064 rows, 3B: 151936) are fine as long as every cached id fits.
    """
    meta = cache.meta
    cached = (meta.get("fingerprints") or {}).get("tokenizer")
    if cached != student_tokenizer_fingerprint:
        raise CacheMismatch(
            f"cache {cache.path} was made with tokenizer {cached}, student.model has {student_tokenizer_fingerprint}: "
            "the cached top-K ids index the teacher's vocabulary; use a student with the same tokenizer or rebuild the cache"
        )
    index = meta.get("index") or {}
    # Caches written before max_token_id was recorded: fall back to the bound the writer validated.
    needed = int(index["max_token_id"]) + 1 if "max_token_id" in index else int(meta["vocab_size"])
    if needed > student_embedding_rows:
        raise CacheMismatch(
            f"cache {cache.path} holds token ids up to {needed - 1} but the student's embedding has only "
            f"{student_embedding_rows} rows: ids >= {student_embedding_rows} cannot be embedded; use a student "
            "whose embedding covers the teacher's vocabulary"
        )


def normalizer_column(cache: Any, kind: str, handling: str, temperature: float, kd_weight: float) -> int | None:
    """Column of the batches' ``teacher_log_normalizers`` [N, M] the KD loss tempers the tail with, or None
    when it tempers none (τ = 1, ``renormalize``, ``mse_topk`` or no KD term).

    Raises CacheMismatch when the loss needs a temperature the cache does not hold (caches of format versions
    1 and 2 hold only τ = 1): their tail cannot be tempered exactly, and an approximation would be far off.
    """
    if kd_weight <= 0 or not needs_log_normalizer(kind, handling, temperature):
        return None
    tempered = tuple(cache.tempered_temperatures)
    if temperature not in tempered:
        held = ", ".join(f"{t:g}" for t in cache.temperatures)
        raise CacheMismatch(
            f"cache {cache.path} tempers the teacher's tail exactly only at τ = {held}; train.temperature="
            f"{temperature:g} with train.topk_handling=tail needs τ={temperature:g} there: rebuild the cache with "
            f"cache.temperatures=[{temperature:g}] (teacher.backend=hf), or set train.topk_handling=renormalize")
    return tempered.index(temperature)


def check_kd_targets(cache: Any, kd_targets: str, temperature: float, kd_weight: float) -> None:
    """Refuse (CacheMismatch) a cache that lacks the targets ``train.kd_targets`` asks for, or sampled targets
    drawn at another τ than ``train.temperature`` (count/S estimates the teacher at the τ it was drawn at)."""
    if kd_weight <= 0:
        return
    if kd_targets == "topk" and cache.top_k == 0:
        raise CacheMismatch(f"cache {cache.path} stores sampled targets only (no top-K); set train.kd_targets=sampled "
                            "or rebuild it with cache.targets=topk or both")
    if kd_targets != "sampled":
        return
    if cache.sampled_draws == 0:
        raise CacheMismatch(f"cache {cache.path} has no sampled targets (targets={cache.targets['mode']}); rebuild it "
                            "with cache.targets=sampled or both (teacher.backend=hf), or set train.kd_targets=topk")
    drawn_at = float(cache.targets["temperature"])
    if drawn_at != temperature:
        raise CacheMismatch(f"cache {cache.path} drew its sampled targets at τ={drawn_at:g}, train.temperature="
                            f"{temperature:g}; train at τ={drawn_at:g} or rebuild the cache at τ={temperature:g}")
