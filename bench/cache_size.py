"""Cache size by target mode, K and top-K encoding: bytes on disk per distilled token and per kept (id, logprob)
entry, and the kept mass; for sampled targets (S draws per position) the unique ids per position.

One hf-scored cache per K in settings.top_ks and per encoding (``plain``, ``compact``) over the same samples
(the config's prompts and ``cache.logprob_dtype``). Sizes are deterministic for given inputs, so there are no repeats; the cache build
time is recorded for information only. The kept mass Σ_k exp(topk_logprob) per position is the share of the
teacher's probability the top-K keeps (1 − kept mass is the tail bucket).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Zstd

from bench.records import BenchResult, ratio
from bench.workspace import BenchSettings, bench_config, config_record
from cache_schema import ENCODINGS
from cache_schema.encoding import COMPACT_ARRAYS, PLAIN_ARRAYS
from cache_schema.format import SAMPLED_COUNTS, SAMPLED_ID_DELTAS
from cache_schema.sampled import SAMPLED_ARRAYS

TOPK_ARRAYS = PLAIN_ARRAYS + COMPACT_ARRAYS  # whichever the cache's encoding stores


def bytes_by_array(cache_path: str) -> dict[str, int]:
    """Bytes of the files under every part's array folder, summed over parts by array name (plus metadata)."""
    sizes: dict[str, int] = defaultdict(int)
    root = Path(cache_path)
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(root).parts
        # parts/<part id>/<array>/... ; everything else (root and part metadata) is "metadata"
        name = parts[2] if len(parts) > 3 and parts[0] == "parts" else "metadata"
        sizes[name] += path.stat().st_size
    return dict(sorted(sizes.items()))


def measure_top_k(settings: BenchSettings, top_k: int, encoding: str = "plain") -> dict[str, Any]:
    from cache_schema import cache_stats, open_cache
    from stages.cache_teacher import cache_teacher

    path = str(Path(settings.work_dir) / "cache_size" / f"k{top_k}-{encoding}")
    cfg = bench_config(settings, "teacher.backend=hf", f"teacher.top_k={top_k}", f"cache.path={path}",
                       f"data.max_samples={settings.cache_size_samples}", f"cache.encoding={encoding}")
    started = time.perf_counter()
    cache_teacher(cfg, workers=0, overwrite=True, progress=False, echo=lambda *_: None)
    build_seconds = time.perf_counter() - started
    stats = cache_stats(open_cache(path))
    arrays = bytes_by_array(path)
    positions = stats["distilled_positions"]
    total = sum(arrays.values())
    topk_bytes = sum(arrays.get(name, 0) for name in TOPK_ARRAYS)
    return {"top_k": top_k, "encoding": encoding, "samples": stats["samples"], "distilled_positions": positions,
            "student_tokens": stats["student_tokens"], "teacher_tokens": stats["teacher_tokens"],
            "logprob_dtype": stats["logprob_dtype"], "bytes_on_disk": total,
            "bytes_per_distilled_token": total / positions,
            "bytes_per_student_token": total / stats["student_tokens"],
            "topk_bytes_per_distilled_token": topk_bytes / positions,
            "bytes_per_kept_entry": topk_bytes / (positions * top_k),
            "bytes_per_kept_entry_all_arrays": total / (positions * top_k),
            "bytes_by_array": arrays, "kept_mass": stats["kept_mass"], "build_seconds": round(build_seconds, 2)}


def ragged_layout_bytes(cache) -> int:
    """What the same sampled targets would take as offsets + flat arrays instead of the [N, S] slot layout: per
    position its unique count (uint8 [N]), then only the counted slots' id deltas (uint32) and counts (uint8),
    each zstd 9 in chunks of 2,048 positions' worth — the alternative the format was chosen against."""
    codec, total = Zstd(level=9), 0
    for part in cache.parts:
        deltas, counts = part.arrays[SAMPLED_ID_DELTAS][:], part.arrays[SAMPLED_COUNTS][:]  # [N, S]
        for start in range(0, len(counts), 2048):
            block_counts, block_deltas = counts[start:start + 2048], deltas[start:start + 2048]
            counted = block_counts > 0
            for array in (counted.sum(axis=1).astype(np.uint8), block_deltas[counted], block_counts[counted]):
                total += len(codec.encode(np.ascontiguousarray(array)))
    return total


def measure_sampled(settings: BenchSettings, draws: int) -> dict[str, Any]:
    """A sampled-only cache (S = ``draws`` per position at train.temperature) over the same samples."""
    from cache_schema import cache_stats, open_cache
    from stages.cache_teacher import cache_teacher

    path = str(Path(settings.work_dir) / "cache_size" / f"sampled-s{draws}")
    cfg = bench_config(settings, "teacher.backend=hf", "cache.targets=sampled", f"cache.samples_per_position={draws}",
                       "train.kd_targets=sampled", f"cache.path={path}", f"data.max_samples={settings.cache_size_samples}")
    cache_teacher(cfg, workers=0, overwrite=True, progress=False, echo=lambda *_: None)
    stats = cache_stats(open_cache(path))
    arrays = bytes_by_array(path)
    positions = stats["distilled_positions"]
    return {"samples_per_position": draws, "samples": stats["samples"], "distilled_positions": positions,
            "bytes_on_disk": sum(arrays.values()), "bytes_per_distilled_token": sum(arrays.values()) / positions,
            "sampled_bytes_per_distilled_token": sum(arrays.get(n, 0) for n in SAMPLED_ARRAYS) / positions,
            "unique_per_position": {k: stats["sampled"][k] for k in ("unique_mean", "unique_p50", "unique_p95")},
            "ragged_layout_sampled_bytes_per_distilled_token": ragged_layout_bytes(open_cache(path)) / positions,
            "bytes_by_array": arrays}


def run_cache_size(settings: BenchSettings) -> BenchResult:
    started = time.perf_counter()
    cfg = bench_config(settings, "teacher.backend=hf")
    result = BenchResult(
        "cache_size", config_record(cfg), settings.as_dict(),
        units={"bytes_per_distilled_token": "bytes on disk (all arrays and metadata) per distilled answer token",
               "bytes_per_student_token": "bytes on disk per student input token (prompt + answer)",
               "topk_bytes_per_distilled_token": "bytes of the topk_ids + topk_logprobs arrays per distilled token",
               "bytes_per_kept_entry": "bytes of the top-K arrays (plain: topk_ids + topk_logprobs; compact: "
                                       "id deltas + logprob codes + row tops) per kept (id, logprob) entry",
               "compact_over_plain": "compact / plain bytes per kept entry, per K",
               "bytes_per_kept_entry_all_arrays": "bytes on disk per kept entry, everything included",
               "bytes_by_array": "bytes on disk by array name, summed over parts",
               "sampled": ("sampled-only caches by S: bytes per distilled token (all arrays; the sampled arrays "
                           "alone; the sampled targets in a ragged offsets + flat layout, zstd 9, for comparison) "
                           "and unique ids per position (mean, p50, p95)"),
               "kept_mass": "Σ_k exp(topk logprob) per distilled position: min, percentiles, max, mean",
               "build_seconds": "seconds to build the cache with the hf backend (information only)"},
        notes=["Sizes are deterministic for given inputs: measured once per K (no repeats).",
               f"Compressed Zarr v3 on local disk; logprob dtype {cfg.cache.logprob_dtype}; raw (uncompressed) "
               "int32 id + fp16 logprob would be 6 bytes per entry."])
    result.results = {encoding: {str(k): measure_top_k(settings, k, encoding) for k in settings.top_ks}
                      for encoding in ENCODINGS}
    result.results["sampled"] = {str(s): measure_sampled(settings, s) for s in settings.extra.get("draws", (32,))}
    result.results["compact_over_plain"] = {
        k: ratio(result.results["compact"][k]["bytes_per_kept_entry"], row["bytes_per_kept_entry"])
        for k, row in result.results["plain"].items()}
    result.seconds = round(time.perf_counter() - started, 1)
    return result
