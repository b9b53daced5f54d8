"""cache_stats(cache): the numbers `inspect-cache` prints (sizes, and the teacher's kept probability mass)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cache_schema import format as fmt
from cache_schema.encoding import topk_array_names

if TYPE_CHECKING:
    from cache_schema.reader import KDCache

_STATS_BLOCK_ROWS = 16 * fmt.LABEL_CHUNK  # whole chunks per read


def kept_mass_per_position(cache: "KDCache", temperature: float = 1.0) -> np.ndarray:
    """Σ_k p_τ(topk id k) for every distilled position i of the cache, float32 [N]: the teacher's mass on its
    top-K at ``temperature`` (1, or one of the cache's ``tempered_temperatures``; exact through the stored
    log-normalizers)."""
    column = None if temperature == 1.0 else cache.tempered_temperatures.index(temperature)
    masses = []
    for part in cache.parts:
        num_rows = part.arrays[fmt.LABEL_LOGPROBS].shape[0]
        for start in range(0, num_rows, _STATS_BLOCK_ROWS):
            rows = part.read_topk(start, start + _STATS_BLOCK_ROWS)[1].astype(np.float64)  # [r, K] decoded
            if column is not None:
                normalizers = part.arrays[fmt.LOG_NORMALIZERS][start : start + _STATS_BLOCK_ROWS, column]  # [r]
                rows = rows / temperature - normalizers.astype(np.float64)[:, None]
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


def _topk_bytes(cache: "KDCache") -> int:
    """Bytes on disk of the arrays that hold the top-K rows (ids + logprobs, whatever the encoding)."""
    topk = topk_array_names(cache.dtypes.topk_encoding)
    return sum(f.stat().st_size for part in cache.parts for name in topk
               for f in (cache.path / fmt.part_path(part.part_id) / name).rglob("*") if f.is_file())


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
        "encoding": cache.dtypes.topk_encoding["name"],
        "bytes_per_kept_entry": _topk_bytes(cache) / (positions * cache.top_k) if positions else None,
        "has_relations": cache.has_relations,
        "bytes_on_disk": bytes_on_disk,
        "bytes_per_position": bytes_on_disk / positions if positions else None,
        "kept_mass": _distribution(kept_mass_per_position(cache)),
        "temperatures": list(cache.temperatures),
        "tempered_kept_mass": {f"{tau:g}": _distribution(kept_mass_per_position(cache, tau))
                               for tau in cache.tempered_temperatures},
        "sources": per_source(cache),
    }
