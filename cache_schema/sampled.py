"""Which targets a cache stores (root ``targets``, format version 4) and how sampled targets are stored.

``topk`` (every cache of versions 1-3): the teacher's top-K logprobs per scored position (cache_schema/encoding.py).

``sampled``: per scored position, S tokens drawn from the teacher's distribution at the recorded temperature
(Random-Sampling KD, Anshumann et al., ACL 2025, arXiv 2503.16870): the unique ids with their counts. count/S is
an unbiased estimate of the teacher's distribution, so the cross-entropy against it is an unbiased estimate of
the full-vocabulary forward cross-entropy (the proposal is the teacher itself: every importance weight is 1).
The cache then has ``top_k = 0`` (the top-K arrays are [N, 0]).

``both``: the top-K arrays and the sampled arrays.

Storage: a fixed slot layout, S slots per position. The U unique ids of a row come first, ascending, stored as
differences (the first id as is) in ``sampled_id_deltas`` uint32 [N, S]; the S - U padding slots have delta 0.
``sampled_counts`` uint8 [N, S] holds each unique id's count and 0 in the padding slots, so counts sum to S.
Both arrays go through zstd level 9 (at the real vocabulary, S = 32: 10.9 bytes per position; a ragged offsets
+ flat layout of the same targets, bench/cache_size.py, 8.6 — the fixed width is what the loader and loss use). Decoding is a cumulative sum per block (no loop per entry); the
padding slots decode to the row's last unique id with count 0. A decoded row whose counts do not sum to S,
whose counted ids are not strictly increasing, whose counted slots are not a prefix, or whose ids leave
[0, vocab_size) is a corrupted chunk: CacheFormatError, never returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cache_schema import format as fmt

TARGET_MODES = ("topk", "sampled", "both")
"""``cache.targets``: what a cache stores per scored position (see the module docstring)."""
MAX_SAMPLES_PER_POSITION = 255
"""S is at most this: counts are stored as uint8."""
SAMPLED_ID_DELTA_DTYPE = np.dtype("uint32")
SAMPLED_COUNT_DTYPE = np.dtype("uint8")
SAMPLED_ARRAYS = (fmt.SAMPLED_ID_DELTAS, fmt.SAMPLED_COUNTS)
SAMPLED_ZSTD_LEVEL = 9


def targets_meta(mode: str, samples_per_position: int = 0, temperature: float = 1.0) -> dict[str, Any]:
    """The root ``targets`` record the writer stores (CacheError for an unknown mode or S outside [1, 255])."""
    if mode not in TARGET_MODES:
        raise fmt.CacheError(f"targets must be one of {TARGET_MODES}, got {mode!r}")
    if mode == "topk":
        return {"mode": "topk"}
    if isinstance(samples_per_position, bool) or not isinstance(samples_per_position, (int, np.integer)) \
            or not 1 <= samples_per_position <= MAX_SAMPLES_PER_POSITION:
        raise fmt.CacheError(f"samples_per_position must be an integer in [1, {MAX_SAMPLES_PER_POSITION}] for "
                             f"targets={mode!r}, got {samples_per_position!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise fmt.CacheError(f"the sampling temperature must be a finite number > 0, got {temperature!r}")
    return {"mode": mode, "samples_per_position": int(samples_per_position), "temperature": float(temperature),
            "id_coding": "sorted_delta_uint32", "count_dtype": SAMPLED_COUNT_DTYPE.name,
            "codec": f"zstd level {SAMPLED_ZSTD_LEVEL}"}


def cache_targets(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The targets record of a cache (``topk`` for versions 1-3); CacheFormatError for one this code lacks."""
    record = fmt.root_record(dict(meta), fmt.TARGETS_META_KEY, "mode", TARGET_MODES, "topk", "targets")
    if record["mode"] != "topk":
        draws = record.get("samples_per_position")
        if not isinstance(draws, int) or not 1 <= draws <= MAX_SAMPLES_PER_POSITION:
            raise fmt.CacheFormatError(f"targets {record!r}: samples_per_position must be in "
                                       f"[1, {MAX_SAMPLES_PER_POSITION}]; the metadata is corrupt, rebuild the cache")
    return record


def sampled_draws(targets: Mapping[str, Any] | None) -> int:
    """S of a cache's targets record, 0 when it stores no sampled targets."""
    if not targets or targets.get("mode", "topk") == "topk":
        return 0
    return int(targets["samples_per_position"])


def canonical_ids(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[N, S] ids, counts -> [N, S] ids with every padding slot (count 0) set to the row's last counted id."""
    marked = np.where(counts > 0, ids, -1)
    return np.maximum.accumulate(marked, axis=1) if marked.size else marked


def encode_sampled(ids: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """ids [N, S] int64 (unique ascending, then padding), counts [N, S] -> the part's sampled arrays."""
    deltas = np.diff(canonical_ids(ids, counts), axis=1, prepend=0)
    return {fmt.SAMPLED_ID_DELTAS: deltas.astype(SAMPLED_ID_DELTA_DTYPE),
            fmt.SAMPLED_COUNTS: counts.astype(SAMPLED_COUNT_DTYPE)}


def row_problems(ids: np.ndarray, counts: np.ndarray, draws: int, vocab_size: int) -> list[str]:
    """What is wrong with [n, S] sampled rows (empty when valid): shapes, counts, order, id range."""
    if ids.shape != counts.shape or ids.ndim != 2 or ids.shape[1] != draws:
        return [f"sampled_ids {ids.shape} / sampled_counts {counts.shape} must both be [n, S={draws}]"]
    if ids.size == 0:
        return []
    problems = []
    if counts.min() < 0 or np.any(counts.sum(axis=1) != draws):
        problems.append(f"sampled_counts: {int(np.count_nonzero(counts.sum(axis=1) != draws))} row(s) whose counts "
                        f"do not sum to S={draws} (or are negative)")
    counted = counts > 0
    if np.any(counted[:, 1:] & ~counted[:, :-1]):
        problems.append("sampled_counts: a counted slot follows a padding slot (the unique ids must come first)")
    steps = np.diff(ids, axis=1)
    if np.any((steps <= 0) & counted[:, 1:]):
        problems.append("sampled_ids: the counted ids of a row are not strictly increasing")
    bad = int(np.count_nonzero(counted & ((ids < 0) | (ids >= vocab_size))))
    if bad:
        problems.append(f"sampled_ids: {bad} id(s) outside [0, {vocab_size})")
    return problems


def decode_sampled(arrays: Mapping[str, np.ndarray], draws: int, vocab_size: int,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """A block's sampled arrays -> (sampled_ids [r, S] int64, sampled_counts [r, S] int64).

    A corrupted chunk (counts not summing to S, ids repeated or out of range) raises CacheFormatError naming
    ``where``: never returned as wrong targets.
    """
    ids = np.cumsum(arrays[fmt.SAMPLED_ID_DELTAS].astype(np.int64), axis=1)  # [r, S]
    counts = arrays[fmt.SAMPLED_COUNTS].astype(np.int64)  # [r, S]
    problems = row_problems(ids, counts, draws, vocab_size)
    if not problems and ids.size and np.any(np.diff(ids, axis=1)[counts[:, 1:] == 0] != 0):
        problems = ["a padding slot with a non-zero id delta"]
    if problems:
        raise fmt.CacheFormatError(f"{where}: sampled targets are corrupted ({'; '.join(problems)}); "
                                   "rebuild the cache")
    return ids, counts
