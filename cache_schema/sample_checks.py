"""Invariants of one sample, shared by the writer (checked before anything is written) and by
validate_cache(cache, deep=True) (checked on what was read back).

The alignment convention checked here is the format's central contract (see README.md): for each distilled
pair j, the teacher distribution in row j predicts token input_ids[label_positions[j]], which is the same
token as teacher_input_ids[teacher_positions[j]].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_schema.format import (
    KEPT_MASS_TOLERANCE,
    LOG_NORMALIZER_SIGN_TOLERANCE,
    LOG_NORMALIZERS_KEY,
    MAX_LOGPROB,
    RELATION_KINDS,
    RELATION_ROW_SUM_TOLERANCE,
    RELATIONS_KEY,
    SAMPLE_KEYS,
    SAMPLED_COUNTS_KEY,
    SAMPLED_IDS_KEY,
    SOURCE_KEY,
    SOURCES_META_KEY,
    CacheValidationError,
    tempered_temperatures,
)
from cache_schema.sampled import cache_targets, row_problems, sampled_draws

_INT_KEYS = ("input_ids", "teacher_input_ids", "label_positions", "teacher_positions", "topk_ids", SAMPLED_IDS_KEY,
             SAMPLED_COUNTS_KEY)
_FLOAT_KEYS = ("topk_logprobs", "label_logprobs", RELATIONS_KEY, LOG_NORMALIZERS_KEY)


@dataclass(frozen=True)
class SampleRules:
    """What a sample must satisfy in one cache: vocabulary, K, relations layout and float tolerances."""

    vocab_size: int
    top_k: int
    num_relation_heads: int | None  # None: the cache has no relations, samples must not carry them
    kept_mass_tolerance: float = KEPT_MASS_TOLERANCE["float32"]
    relation_row_tolerance: float = RELATION_ROW_SUM_TOLERANCE["float32"]
    sources: tuple[str, ...] | None = None  # None: the cache records no source, samples must not carry one
    tempered: tuple[float, ...] = ()  # temperatures other than 1: samples carry log_normalizers [n, M] exactly then
    sampled_draws: int = 0  # S > 0: samples carry sampled_ids / sampled_counts [n, S] (version 4)


def rules_from_meta(meta: Mapping[str, Any]) -> SampleRules:
    """Sample invariants of a cache, from its root metadata (tolerances follow the storage dtypes)."""
    relations = meta.get("relations")
    return SampleRules(
        vocab_size=int(meta["vocab_size"]),
        top_k=int(meta["top_k"]),
        num_relation_heads=int(relations["num_relation_heads"]) if relations else None,
        kept_mass_tolerance=KEPT_MASS_TOLERANCE[meta["logprob_dtype"]],
        relation_row_tolerance=RELATION_ROW_SUM_TOLERANCE[relations["dtype"]] if relations else 0.0,
        sources=tuple(meta[SOURCES_META_KEY]) if meta.get(SOURCES_META_KEY) else None,
        tempered=tempered_temperatures(meta),
        sampled_draws=sampled_draws(cache_targets(meta)),
    )


def _as_array(name: str, value: Any, sample_id: str) -> np.ndarray:
    array = np.asarray(value)
    if array.size == 0 and array.dtype == np.float64 and name in _INT_KEYS:
        array = array.astype(np.int64)  # np.asarray([]) is float64; an empty id list is still ids
    if name in _INT_KEYS and not np.issubdtype(array.dtype, np.integer):
        raise CacheValidationError(f"sample {sample_id!r}: {name} must hold integers, got dtype {array.dtype}")
    if name in _INT_KEYS:
        array = array.astype(np.int64, copy=False)  # unsigned inputs would wrap in np.diff / range checks
    if name in _FLOAT_KEYS and not (np.issubdtype(array.dtype, np.floating) or array.size == 0):
        raise CacheValidationError(f"sample {sample_id!r}: {name} must hold floats, got dtype {array.dtype}")
    return array


def coerce_sample(sample: Mapping[str, Any], rules: SampleRules) -> dict[str, Any]:
    """Check a sample's keys and shapes and return it as numpy arrays.

    Shapes: input_ids [T], teacher_input_ids [Tt], label_positions/teacher_positions/label_logprobs [n],
    topk_ids/topk_logprobs [n, K], relations [3, A_r, n, n], log_normalizers [n, M]. Raises CacheValidationError naming the sample.
    """
    if not isinstance(sample, Mapping):
        raise CacheValidationError(f"a sample must be a dict of arrays, got {type(sample).__name__}")
    sample_id = sample.get("sample_id")
    if not isinstance(sample_id, str) or not sample_id:
        raise CacheValidationError(f"sample_id must be a non-empty str, got {sample_id!r}")
    expected = set(SAMPLE_KEYS) | ({RELATIONS_KEY} if rules.num_relation_heads is not None else set())
    expected |= {SOURCE_KEY} if rules.sources is not None else set()
    expected |= {LOG_NORMALIZERS_KEY} if rules.tempered else set()
    expected |= {SAMPLED_IDS_KEY, SAMPLED_COUNTS_KEY} if rules.sampled_draws else set()
    missing, unknown = sorted(expected - set(sample)), sorted(set(sample) - expected)
    if missing or unknown:
        hint = " (this cache has no relations group)" if RELATIONS_KEY in unknown else ""
        hint += " (this cache records no sources)" if SOURCE_KEY in unknown else ""
        hint += " (this cache has no temperature other than 1)" if LOG_NORMALIZERS_KEY in unknown else ""
        hint += " (this cache has no sampled targets)" if SAMPLED_IDS_KEY in unknown else ""
        raise CacheValidationError(
            f"sample {sample_id!r}: missing keys {missing}, unexpected keys {unknown}{hint}; "
            f"a sample holds exactly {sorted(expected)}"
        )
    arrays: dict[str, Any] = {"sample_id": sample_id}
    if rules.sources is not None:
        if sample[SOURCE_KEY] not in rules.sources:
            raise CacheValidationError(f"sample {sample_id!r}: source {sample[SOURCE_KEY]!r} is not one of the "
                                       f"cache's sources {list(rules.sources)}")
        arrays[SOURCE_KEY] = sample[SOURCE_KEY]
    for name in sorted(expected - {"sample_id", SOURCE_KEY}):
        arrays[name] = _as_array(name, sample[name], sample_id)
    num_pairs = arrays["label_positions"].shape[0] if arrays["label_positions"].ndim == 1 else -1
    for name in ("topk_ids", "topk_logprobs"):
        if arrays[name].size == 0 and num_pairs == 0:
            arrays[name] = arrays[name].reshape(0, rules.top_k)
    for name in (SAMPLED_IDS_KEY, SAMPLED_COUNTS_KEY):
        if name in arrays and arrays[name].size == 0 and num_pairs == 0:
            arrays[name] = arrays[name].reshape(0, rules.sampled_draws)
    if LOG_NORMALIZERS_KEY in arrays and arrays[LOG_NORMALIZERS_KEY].size == 0 and num_pairs == 0:
        arrays[LOG_NORMALIZERS_KEY] = arrays[LOG_NORMALIZERS_KEY].reshape(0, len(rules.tempered))
    if RELATIONS_KEY in arrays and arrays[RELATIONS_KEY].size == 0 and num_pairs == 0:
        arrays[RELATIONS_KEY] = arrays[RELATIONS_KEY].reshape(len(RELATION_KINDS), rules.num_relation_heads, 0, 0)
    shape_problem = _shape_problem(arrays, rules)
    if shape_problem:
        raise CacheValidationError(f"sample {sample_id!r}: {shape_problem}")
    return arrays


def _shape_problem(arrays: Mapping[str, Any], rules: SampleRules) -> str | None:
    """First shape inconsistency of a coerced sample, or None."""
    for name in ("input_ids", "teacher_input_ids", "label_positions", "teacher_positions", "label_logprobs"):
        if arrays[name].ndim != 1:
            return f"{name} must be 1-D, got shape {arrays[name].shape}"
    if arrays["input_ids"].shape[0] == 0:
        return "input_ids is empty"
    n = arrays["label_positions"].shape[0]
    for name in ("teacher_positions", "label_logprobs"):
        if arrays[name].shape != (n,):
            return f"{name} has shape {arrays[name].shape}, expected ({n},) like label_positions"
    for name in ("topk_ids", "topk_logprobs"):
        if arrays[name].shape != (n, rules.top_k):
            return f"{name} has shape {arrays[name].shape}, expected [n, K] = ({n}, {rules.top_k})"
    if LOG_NORMALIZERS_KEY in arrays and arrays[LOG_NORMALIZERS_KEY].shape != (n, len(rules.tempered)):
        return (f"{LOG_NORMALIZERS_KEY} has shape {arrays[LOG_NORMALIZERS_KEY].shape}, expected [n, M] = "
                f"({n}, {len(rules.tempered)}) (one column per temperature other than 1)")
    for name in (SAMPLED_IDS_KEY, SAMPLED_COUNTS_KEY):
        if name in arrays and arrays[name].shape != (n, rules.sampled_draws):
            return f"{name} has shape {arrays[name].shape}, expected [n, S] = ({n}, {rules.sampled_draws})"
    if RELATIONS_KEY in arrays:
        want = (len(RELATION_KINDS), rules.num_relation_heads, n, n)
        if arrays[RELATIONS_KEY].shape != want:
            return f"relations has shape {arrays[RELATIONS_KEY].shape}, expected [3, A_r, n, n] = {want}"
    return None


def _id_problems(arrays: Mapping[str, Any], vocab_size: int) -> list[str]:
    problems = []
    for name in ("input_ids", "teacher_input_ids", "topk_ids"):
        ids = arrays[name]
        bad = int(np.count_nonzero((ids < 0) | (ids >= vocab_size)))
        if bad:
            problems.append(f"{name}: {bad} id(s) outside [0, {vocab_size}) (max {int(ids.max())})")
    return problems


def _alignment_problems(arrays: Mapping[str, Any]) -> list[str]:
    """Positions in range, strictly increasing, and the token-equality invariant of paired positions."""
    problems = []
    positions, teacher_positions = arrays["label_positions"], arrays["teacher_positions"]
    limits = {
        "label_positions": arrays["input_ids"].shape[0],
        "teacher_positions": arrays["teacher_input_ids"].shape[0],
    }
    for name, values in (("label_positions", positions), ("teacher_positions", teacher_positions)):
        if values.size == 0:
            continue
        if values.min() < 1 or values.max() >= limits[name]:
            problems.append(
                f"{name} out of range: need 1 <= p < {limits[name]}, got min {values.min()} max {values.max()}"
            )
        if np.any(np.diff(values) <= 0):
            problems.append(f"{name} not strictly increasing")
    if problems or positions.size == 0:
        return problems
    student_tokens = arrays["input_ids"][positions]
    teacher_tokens = arrays["teacher_input_ids"][teacher_positions]
    mismatched = np.flatnonzero(student_tokens != teacher_tokens)
    if mismatched.size:
        j = int(mismatched[0])
        problems.append(
            f"token mismatch at {mismatched.size} pair(s): first pair {j}: input_ids[{positions[j]}]="
            f"{student_tokens[j]} but teacher_input_ids[{teacher_positions[j]}]={teacher_tokens[j]}"
        )
    return problems


def _logprob_problems(arrays: Mapping[str, Any], rules: SampleRules) -> list[str]:
    problems = []
    topk = np.asarray(arrays["topk_logprobs"], dtype=np.float32)
    labels = np.asarray(arrays["label_logprobs"], dtype=np.float32)
    for name, values in (("topk_logprobs", topk), ("label_logprobs", labels)):
        if not np.all(np.isfinite(values)):
            problems.append(f"{name}: {int(np.count_nonzero(~np.isfinite(values)))} non-finite value(s) (NaN/inf)")
        elif values.size and values.max() > MAX_LOGPROB:
            problems.append(f"{name}: positive logprob {float(values.max()):.4g} (must be <= 0)")
    if problems or topk.shape[0] == 0:
        return problems
    unsorted_rows = np.flatnonzero(np.any(np.diff(topk, axis=1) > 0, axis=1))
    if unsorted_rows.size:
        problems.append(
            f"topk rows not sorted by descending logprob: {unsorted_rows.size} row(s), first row {unsorted_rows[0]}"
        )
    kept_mass = np.exp(topk.astype(np.float64)).sum(axis=1)
    if kept_mass.max() > 1.0 + rules.kept_mass_tolerance:
        row = int(kept_mass.argmax())
        problems.append(f"kept mass Σexp(top-K) > 1: {kept_mass.max():.6f} at row {row}")
    return problems


def _normalizer_problems(arrays: Mapping[str, Any], rules: SampleRules) -> list[str]:
    """log Σ_V p^(1/τ): finite, of the sign τ dictates, and at least the top-K's share (tempered kept mass ≤ 1)."""
    if not rules.tempered or arrays["label_positions"].size == 0:
        return []
    normalizers = np.asarray(arrays[LOG_NORMALIZERS_KEY], dtype=np.float64)  # [n, M]
    if not np.all(np.isfinite(normalizers)):
        return [f"{LOG_NORMALIZERS_KEY}: non-finite value(s) (NaN/inf)"]
    topk = np.asarray(arrays["topk_logprobs"], dtype=np.float64)  # [n, K]
    problems = []
    for column, tau in enumerate(rules.tempered):
        values = normalizers[:, column]
        wrong_sign = values < -LOG_NORMALIZER_SIGN_TOLERANCE if tau > 1 else values > LOG_NORMALIZER_SIGN_TOLERANCE
        if wrong_sign.any():
            problems.append(f"{LOG_NORMALIZERS_KEY} at τ={tau:g}: {int(wrong_sign.sum())} value(s) of the wrong sign "
                            f"(log Σ p^(1/τ) is {'≥' if tau > 1 else '≤'} 0)")
            continue
        kept = np.exp(topk / tau - values[:, None]).sum(axis=1)  # [n] tempered kept mass
        tolerance = rules.kept_mass_tolerance * max(1.0, 1.0 / tau)  # rounding of topk grows by 1/τ
        if kept.max() > 1.0 + tolerance:
            problems.append(f"tempered kept mass at τ={tau:g} > 1: {kept.max():.6f} at row {int(kept.argmax())}")
    return problems


def _relation_problems(arrays: Mapping[str, Any], rules: SampleRules) -> list[str]:
    if RELATIONS_KEY not in arrays:
        return []
    relations = np.asarray(arrays[RELATIONS_KEY], dtype=np.float64)  # [3, A_r, n, n]
    if relations.size == 0:
        return []
    if not np.all(np.isfinite(relations)):
        return ["relations: non-finite value(s) (NaN/inf)"]
    if relations.min() < 0:
        return [f"relations: negative value {relations.min():.4g}"]
    row_error = np.abs(relations.sum(axis=-1) - 1.0).max()
    if row_error > rules.relation_row_tolerance:
        return [f"relations rows do not sum to 1 (max error {row_error:.4g})"]
    return []


def sample_problems(arrays: Mapping[str, Any], rules: SampleRules) -> list[str]:
    """All value-level problems of a coerced sample (empty list when the sample is valid)."""
    return (
        _id_problems(arrays, rules.vocab_size)
        + _alignment_problems(arrays)
        + _logprob_problems(arrays, rules)
        + _normalizer_problems(arrays, rules)
        + _relation_problems(arrays, rules)
        + (row_problems(arrays[SAMPLED_IDS_KEY], arrays[SAMPLED_COUNTS_KEY], rules.sampled_draws, rules.vocab_size)
           if rules.sampled_draws else [])
    )
