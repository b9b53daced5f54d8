"""validate_cache(cache, deep): check a complete cache against the format's invariants.

deep=False checks metadata, offsets (start at 0, monotone, ending at their array's length), sample id
uniqueness and index totals. deep=True additionally reads every sample and checks its values with the same
rules the writer applied (sample_checks.py), and recomputes each part's checksum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cache_schema import format as fmt
from cache_schema.encoding import topk_array_names
from cache_schema.part_layout import part_checksum
from cache_schema.sample_checks import rules_from_meta, sample_problems

if TYPE_CHECKING:
    from cache_schema.reader import KDCache, PartView

MAX_REPORTED_PROBLEMS = 10
_VALIDATE_BLOCK = 256  # samples read at once during deep validation


class _ProblemLog:
    """Collects problems until MAX_REPORTED_PROBLEMS, after which validation stops early."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    @property
    def full(self) -> bool:
        return len(self.problems) >= MAX_REPORTED_PROBLEMS


def _meta_problems(meta: dict[str, Any]) -> list[str]:
    problems = [
        f"metadata key {key!r} missing"
        for key in ("fingerprints", "top_k", "vocab_size", "id_dtype", "logprob_dtype", "num_parts", "index")
        if key not in meta
    ]
    if not problems and np.dtype(meta["id_dtype"]) != fmt.id_dtype_for_vocab(int(meta["vocab_size"])):
        problems.append(f"id_dtype {meta['id_dtype']} does not match vocab_size {meta['vocab_size']}")
    if not problems and meta["logprob_dtype"] not in fmt.LOGPROB_DTYPES:
        problems.append(f"logprob_dtype {meta['logprob_dtype']!r} not one of {fmt.LOGPROB_DTYPES}")
    return problems


def _offset_problems(part: "PartView") -> list[str]:
    """Offsets of one part: start at 0, monotone non-decreasing, end at the flat array's length."""
    problems = []
    checks = [
        (fmt.SAMPLE_ID_OFFSETS, part.arrays[fmt.SAMPLE_ID_OFFSETS][:], fmt.SAMPLE_ID_BYTES),
        (fmt.TOKEN_OFFSETS, part.offsets.tokens, fmt.INPUT_IDS),
        (fmt.TEACHER_TOKEN_OFFSETS, part.offsets.teacher_tokens, fmt.TEACHER_INPUT_IDS),
        (fmt.LABEL_OFFSETS, part.offsets.labels, fmt.LABEL_LOGPROBS),
    ]
    if part.offsets.relations is not None:
        checks.append((fmt.RELATION_OFFSETS, part.offsets.relations, fmt.RELATIONS))
    for name, offsets, flat_name in checks:
        where = f"part {part.part_id}: {name}"
        if offsets[0] != 0:
            problems.append(f"{where} starts at {offsets[0]}, not 0")
        decreasing = np.flatnonzero(np.diff(offsets) < 0)
        if decreasing.size:
            s = int(decreasing[0])
            sample_id = part.sample_ids[s] if s < len(part.sample_ids) else "?"
            problems.append(f"{where} not monotone at sample {s} ({sample_id!r}): {offsets[s]} -> {offsets[s + 1]}")
        if offsets[-1] != part.arrays[flat_name].shape[0]:
            problems.append(f"{where} ends at {offsets[-1]} but {flat_name} has {part.arrays[flat_name].shape[0]} rows")
    label_arrays = (fmt.LABEL_POSITIONS, fmt.TEACHER_POSITIONS, fmt.LOG_NORMALIZERS,
                    *topk_array_names(part.topk_encoding))
    for name in (name for name in label_arrays if name in part.arrays):
        if part.arrays[name].shape[0] != part.arrays[fmt.LABEL_LOGPROBS].shape[0]:
            problems.append(f"part {part.part_id}: {name} length differs from {fmt.LABEL_LOGPROBS}")
    return problems


def _shallow(cache: "KDCache", log: _ProblemLog) -> set[int]:
    """Metadata, offsets, ids and totals; returns the part ids whose offsets are broken (not read deeply)."""
    for problem in _meta_problems(cache.meta):
        log.add(problem)
    broken_parts = set()
    for part in cache.parts:
        problems = _offset_problems(part)
        if problems:
            broken_parts.add(part.part_id)
        for problem in problems:
            log.add(problem)
    seen: set[str] = set()
    for sample_id in cache.sample_ids:
        if sample_id in seen:
            log.add(f"sample id {sample_id!r} appears more than once")
        seen.add(sample_id)
    totals = cache.meta["index"]["totals"]
    summed = sum(part.commit["num_label_positions"] for part in cache.parts)
    if totals["num_label_positions"] != summed:
        log.add(f"index totals.num_label_positions={totals['num_label_positions']} but parts sum to {summed}")
    return broken_parts


def _deep_part(cache: "KDCache", part: "PartView", global_start: int, log: _ProblemLog) -> None:
    rules = rules_from_meta(cache.meta)
    num_samples = len(part.sample_ids)
    for block_start in range(0, num_samples, _VALIDATE_BLOCK):
        block_stop = min(num_samples, block_start + _VALIDATE_BLOCK)
        for sample in cache.read_range(global_start + block_start, global_start + block_stop):
            for problem in sample_problems(sample, rules):
                log.add(f"part {part.part_id} sample {sample['sample_id']!r}: {problem}")
            if log.full:
                return
    checksum = part_checksum(part.arrays, cache.dtypes.array_names())
    if checksum != part.commit["checksum"]:
        log.add(f"part {part.part_id}: checksum mismatch (stored arrays changed after commit)")


def validate_cache(cache: "KDCache", deep: bool = True) -> None:
    """Raise CacheValidationError with the first problems found (one line), or return None."""
    log = _ProblemLog()
    broken_parts = _shallow(cache, log)
    if deep and not _meta_problems(cache.meta):
        global_start = 0
        for part in cache.parts:
            if log.full:
                break
            if part.part_id not in broken_parts:
                _deep_part(cache, part, global_start, log)
            global_start += len(part.sample_ids)
    if log.problems:
        shown = log.problems[:MAX_REPORTED_PROBLEMS]
        more = " (stopped early)" if log.full else ""
        raise fmt.CacheValidationError(
            f"cache at {cache.path} failed validation, {len(shown)} problem(s){more}: " + "; ".join(shown)
        )
