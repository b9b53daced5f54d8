"""cache_stats(cache): the numbers `inspect-cache` prints (sizes, and the teacher's kept probability mass)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cache_schema import format as fmt
from cache_schema.encoding import topk_array_names
from cache_schema.sampled import SAMPLED_ARRAYS

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


def _array_bytes(cache: "KDCache", names: tuple[str, ...]) -> int:
    """Bytes on disk of the named arrays of every part (their chunks and zarr.json)."""
    return sum(f.stat().st_size for part in cache.parts for name in names
               for f in (cache.path / fmt.part_path(part.part_id) / name).rglob("*") if f.is_file())


def _topk_bytes(cache: "KDCache") -> int:
    """Bytes on disk of the arrays that hold the top-K rows (ids + logprobs, whatever the encoding)."""
    return _array_bytes(cache, topk_array_names(cache.dtypes.topk_encoding))


def unique_sampled_per_position(cache: "KDCache") -> np.ndarray:
    """[N] the number of unique sampled ids at every distilled position (0 rows for a cache without them)."""
    counts = [part.arrays[fmt.SAMPLED_COUNTS][start : start + _STATS_BLOCK_ROWS] > 0
              for part in cache.parts if cache.sampled_draws
              for start in range(0, part.arrays[fmt.LABEL_LOGPROBS].shape[0], _STATS_BLOCK_ROWS)]
    return np.concatenate([c.sum(axis=1) for c in counts]) if counts else np.zeros(0, np.int64)


def sampled_stats(cache: "KDCache") -> dict[str, Any] | None:
    """S, the sampling τ, unique ids per position (mean, p50, p95) and the sampled arrays' bytes per position."""
    if not cache.sampled_draws:
        return None
    unique = unique_sampled_per_position(cache)
    positions = max(cache.num_label_positions, 1)
    return {"samples_per_position": cache.sampled_draws, "temperature": cache.targets["temperature"],
            "unique_mean": float(unique.mean()) if unique.size else None,
            "unique_p50": float(np.percentile(unique, 50)) if unique.size else None,
            "unique_p95": float(np.percentile(unique, 95)) if unique.size else None,
            "bytes_per_position": _array_bytes(cache, SAMPLED_ARRAYS) / positions}


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
        "targets": cache.targets["mode"],
        "bytes_per_kept_entry": _topk_bytes(cache) / (positions * cache.top_k) if positions and cache.top_k
        else None,
        "sampled": sampled_stats(cache),
        "has_relations": cache.has_relations,
        "bytes_on_disk": bytes_on_disk,
        "bytes_per_position": bytes_on_disk / positions if positions else None,
        "kept_mass": _distribution(kept_mass_per_position(cache)),
        "temperatures": list(cache.temperatures),
        "tempered_kept_mass": {f"{tau:g}": _distribution(kept_mass_per_position(cache, tau))
                               for tau in cache.tempered_temperatures},
        "sources": per_source(cache),
    }
