"""cache_stats(cache): the numbers `inspect-cache` prints (sizes, and the teacher's kept probability mass)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cache_schema import format as fmt

if TYPE_CHECKING:
    from cache_schema.reader import KDCache

_STATS_BLOCK_ROWS = 16 * fmt.LABEL_CHUNK  # whole chunks per read


def kept_mass_per_position(cache: "KDCache") -> np.ndarray:
    """Σ_k exp(topk_logprobs[i, k]) for every distilled position i of the cache, float32 [N]."""
    masses = []
    for part in cache.parts:
        logprobs = part.arrays[fmt.TOPK_LOGPROBS]
        for start in range(0, logprobs.shape[0], _STATS_BLOCK_ROWS):
            rows = logprobs[start : start + _STATS_BLOCK_ROWS].astype(np.float64)
            masses.append(np.exp(rows).sum(axis=1).astype(np.float32))
    return np.concatenate(masses) if masses else np.zeros(0, dtype=np.float32)


def _distribution(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    p1, p10, median, p90 = np.percentile(values, [1, 10, 50, 90])
    return {
        "min": float(values.min()),
        "p1": float(p1),
        "p10": float(p10),
        "median": float(median),
        "p90": float(p90),
        "max": float(values.max()),
        "mean": float(values.mean(dtype=np.float64)),
    }


def per_source(cache: "KDCache") -> dict[str, dict[str, int]] | None:
    """{source: {samples, student_tokens, teacher_tokens, distilled_positions}} from the in-memory offsets,
    in the cache's source order; None for a cache that records no sources."""
    if not cache.has_sources:
        return None
    table = {name: {"samples": 0, "student_tokens": 0, "teacher_tokens": 0, "distilled_positions": 0}
             for name in cache.source_names}
    for part in cache.parts:
        columns = {"student_tokens": np.diff(part.offsets.tokens), "teacher_tokens":
                   np.diff(part.offsets.teacher_tokens), "distilled_positions": np.diff(part.offsets.labels)}
        for local, name in enumerate(part.sources or []):
            table[name]["samples"] += 1
            for key, values in columns.items():
                table[name][key] += int(values[local])
    return table


def cache_stats(cache: "KDCache") -> dict[str, Any]:
    """Counts, storage size and the kept-mass distribution (1 − kept mass is the tail the cache drops)."""
    bytes_on_disk = cache.bytes_on_disk()
    positions = cache.num_label_positions
    return {
        "samples": len(cache),
        "parts": len(cache.parts),
        "student_tokens": cache.num_tokens,
        "teacher_tokens": cache.num_teacher_tokens,
        "distilled_positions": positions,
        "top_k": cache.top_k,
        "vocab_size": cache.vocab_size,
        "logprob_dtype": cache.meta["logprob_dtype"],
        "has_relations": cache.has_relations,
        "bytes_on_disk": bytes_on_disk,
        "bytes_per_position": bytes_on_disk / positions if positions else None,
        "kept_mass": _distribution(kept_mass_per_position(cache)),
        "sources": per_source(cache),
    }
