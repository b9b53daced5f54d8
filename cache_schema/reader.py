"""Reading a complete kd-topk-cache: open_cache(path) -> KDCache.

Opening checks the format name and version, the completion record, and that the index agrees with every
part's commit record and array shapes; it keeps every part's small offset arrays and sample ids in memory.
Sample reads are contiguous slices of the flat arrays (zarr v3 fancy indexing is slow).
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

try:  # zarr's own event loop: lets one sample's ~8 slice reads run concurrently (measured 2x faster)
    from zarr.core.sync import sync as _run_on_zarr_loop
except ImportError:  # pragma: no cover - a future zarr that moved it; sequential reads still work
    _run_on_zarr_loop = None

from cache_schema import format as fmt
from cache_schema.cache_state import peek_cache_state, read_part_commit
from cache_schema.encoding import decode_rows, topk_array_names
from cache_schema.integrity import REPAIR_HINT, CacheDamagedError, missing_files, part_store
from cache_schema.part_layout import PartOffsets, StorageDtypes, decode_sample_ids, split_block
from cache_schema.sampled import SAMPLED_ARRAYS, decode_sampled

_ITER_BLOCK = 256  # samples per read when iterating: amortizes chunk decoding across neighbours
SKIPPABLE_KEYS = (fmt.TEACHER_INPUT_IDS, fmt.TEACHER_POSITIONS)
"""Sample keys a reader may leave out (``KDCache.read_range(skip=...)``); the sample key equals the array name."""
_FLAT_BY_OFFSETS = {
    fmt.INPUT_IDS: "tokens",
    fmt.TEACHER_INPUT_IDS: "teacher_tokens",
    fmt.LABEL_POSITIONS: "labels",
    fmt.TEACHER_POSITIONS: "labels",
    fmt.LABEL_LOGPROBS: "labels",
    fmt.TOPK_IDS: "labels",
    fmt.TOPK_LOGPROBS: "labels",
    fmt.TOPK_ID_DELTAS: "labels",
    fmt.TOPK_LOGPROB_CODES: "labels",
    fmt.TOPK_TOP_LOGPROBS: "labels",
    fmt.RELATIONS: "relations",
    fmt.LOG_NORMALIZERS: "labels",
    fmt.SAMPLED_ID_DELTAS: "labels",
    fmt.SAMPLED_COUNTS: "labels",
}


@dataclass
class PartView:
    """One committed part as the reader sees it: its arrays (zarr handles), offsets and sample ids."""

    part_id: int
    arrays: dict[str, zarr.Array]
    offsets: PartOffsets
    sample_ids: list[str]
    commit: dict[str, Any]
    sources: list[str] | None = None
    """Source name of each local sample (format version 2 caches that record sources), else None."""
    dtypes: StorageDtypes | None = None
    """The cache's storage layout (its top-K encoding decides which arrays hold the top-K rows)."""
    vocab_size: int = 0

    def read_block(self, first: int, stop: int, skip: Collection[str] = ()) -> dict[str, np.ndarray]:
        """Rows of every flat array covering local samples [first, stop), one contiguous slice each; the top-K
        rows decoded to ``topk_ids`` / ``topk_logprobs`` whatever the encoding. Arrays named in ``skip`` (only
        ``teacher_input_ids`` / ``teacher_positions`` may be skipped) are not read."""
        slices = {}
        for name, offsets_name in _FLAT_BY_OFFSETS.items():
            bounds = getattr(self.offsets, offsets_name)
            if bounds is not None and name in self.arrays and name not in skip:
                slices[name] = slice(int(bounds[first]), int(bounds[stop]))
        return self._decoded(self._read(slices))

    def read_topk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded top-K rows [start, stop) of the part's N axis: (ids [r, K] int64, logprobs [r, K] float32)."""
        names = topk_array_names(self.topk_encoding)
        block = self._decoded(self._read({name: slice(start, stop) for name in names}))
        return block[fmt.TOPK_IDS], block[fmt.TOPK_LOGPROBS]

    @property
    def topk_encoding(self) -> dict[str, Any]:
        """The cache's top-K encoding record (``plain`` when the part was built without a layout)."""
        return self.dtypes.topk_encoding if self.dtypes is not None else {"name": "plain"}

    def _read(self, slices: dict[str, slice]) -> dict[str, np.ndarray]:
        if _run_on_zarr_loop is None:
            return {name: self.arrays[name][rows] for name, rows in slices.items()}

        async def read_all() -> list[Any]:
            return await asyncio.gather(*(self.arrays[name].async_array.getitem(rows) for name, rows in slices.items()))

        return dict(zip(slices, _run_on_zarr_loop(read_all()), strict=True))

    def _decoded(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if fmt.SAMPLED_ID_DELTAS in block:  # the sampled arrays hold the sample keys sampled_ids / sampled_counts
            ids, counts = decode_sampled(block, self.dtypes.sampled_draws, self.vocab_size, f"part {self.part_id}")
            block = {**block, fmt.SAMPLED_IDS_KEY: ids, fmt.SAMPLED_COUNTS_KEY: counts}
        encoding = self.topk_encoding
        if encoding["name"] == "plain" or fmt.TOPK_ID_DELTAS not in block:
            return block
        ids, logprobs = decode_rows(block, encoding, self.vocab_size, f"part {self.part_id}")
        return {**block, fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: logprobs}


def _check_header(path: Path) -> dict[str, Any]:
    """Root metadata of a complete cache of a supported version, else a one-line CacheError."""
    if not path.exists():
        raise fmt.CacheFormatError(f"no cache at {path}: the path does not exist (run the teacher-caching stage)")
    state, meta = peek_cache_state(path)
    if state in ("absent", "not_a_cache"):
        raise fmt.CacheFormatError(
            f"{path} is not a {fmt.FORMAT_NAME} cache (no Zarr v3 group with format={fmt.FORMAT_NAME!r})"
        )
    assert meta is not None
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise fmt.CacheFormatError(f"{path}: unknown format_version {version!r}")
    if version > fmt.FORMAT_VERSION:
        raise fmt.CacheFormatError(
            f"{path} has format_version {version}, newer than this code supports ({fmt.FORMAT_VERSION}); "
            "upgrade cache_schema"
        )
    if state == "incomplete":
        raise fmt.IncompleteCacheError(
            f"cache at {path} is incomplete (no completion record): resume the teacher-caching stage to finish it"
        )
    return meta


def _part_sources(where: str, arrays: dict[str, zarr.Array], num_samples: int,
                  names: list[str] | None) -> list[str] | None:
    """Each local sample's source name from `source_index` [S], or None when the cache records no sources."""
    if names is None:
        return None
    index = arrays[fmt.SOURCE_INDEX][:]
    if index.shape != (num_samples,) or (index.size and (index.min() < 0 or index.max() >= len(names))):
        raise fmt.CacheFormatError(f"{where}: source_index has shape {index.shape} or values outside "
                                   f"[0, {len(names)}); the cache is corrupt, rebuild it")
    return [names[int(i)] for i in index]


def _open_part(path: Path, part_id: int, entry: dict[str, Any], dtypes: StorageDtypes, vocab_size: int,
               sources: list[str] | None = None) -> PartView:
    """Open one part and check it against its index entry; CacheFormatError on any disagreement."""
    has_relations, num_tempered = dtypes.relations is not None, len(dtypes.tempered)
    commit = read_part_commit(path, part_id)
    where = f"{path}: part {part_id}"
    if commit is None or commit != entry:
        what = "has no commit record" if commit is None else "has a commit record that disagrees with the index"
        raise CacheDamagedError(f"{where} {what} (deleted or rewritten after the cache was completed); the cache "
                                f"is damaged: {REPAIR_HINT}")
    missing_files(path, part_id, commit)  # a deleted chunk must be an error, never the fill value
    group = zarr.open_group(store=part_store(path, part_id, commit), mode="r", zarr_format=3)
    try:
        arrays = {name: group[name] for name in dtypes.array_names()}
    except KeyError as error:
        raise CacheDamagedError(f"{where}: array {error} is missing; the cache is damaged: {REPAIR_HINT}") from None
    loaded = {name: arrays[name][:] for name in fmt.OFFSET_ARRAYS}
    relation_offsets = arrays[fmt.RELATION_OFFSETS][:] if has_relations else None
    expected_lengths = {
        fmt.SAMPLE_ID_BYTES: loaded[fmt.SAMPLE_ID_OFFSETS][-1],
        fmt.INPUT_IDS: entry["num_tokens"],
        fmt.TEACHER_INPUT_IDS: entry["num_teacher_tokens"],
        fmt.LABEL_POSITIONS: entry["num_label_positions"],
        fmt.TEACHER_POSITIONS: entry["num_label_positions"],
        fmt.LABEL_LOGPROBS: entry["num_label_positions"],
        **{name: entry["num_label_positions"] for name in topk_array_names(dtypes.topk_encoding)},
        **({name: entry["num_label_positions"] for name in SAMPLED_ARRAYS} if dtypes.sampled_draws else {}),
    }
    if has_relations:
        expected_lengths[fmt.RELATIONS] = entry["num_relation_values"]
    if num_tempered:
        expected_lengths[fmt.LOG_NORMALIZERS] = entry["num_label_positions"]
        if arrays[fmt.LOG_NORMALIZERS].shape[1:] != (num_tempered,):
            raise fmt.CacheFormatError(f"{where}: {fmt.LOG_NORMALIZERS} has shape {arrays[fmt.LOG_NORMALIZERS].shape}, "
                                       f"expected [N, {num_tempered}] (one column per temperature other than 1)")
    for name, offsets in list(loaded.items()) + ([(fmt.RELATION_OFFSETS, relation_offsets)] if has_relations else []):
        if offsets.shape != (entry["num_samples"] + 1,):
            raise fmt.CacheFormatError(
                f"{where}: {name} has shape {offsets.shape}, index says {entry['num_samples']} samples"
            )
    for name, length in expected_lengths.items():
        if arrays[name].shape[0] != length:
            raise fmt.CacheFormatError(f"{where}: {name} has {arrays[name].shape[0]} rows, index says {length}")
    offsets = PartOffsets(
        tokens=loaded[fmt.TOKEN_OFFSETS],
        teacher_tokens=loaded[fmt.TEACHER_TOKEN_OFFSETS],
        labels=loaded[fmt.LABEL_OFFSETS],
        relations=relation_offsets,
    )
    sample_ids = decode_sample_ids(loaded[fmt.SAMPLE_ID_OFFSETS], arrays[fmt.SAMPLE_ID_BYTES][:])
    part_sources = _part_sources(where, arrays, entry["num_samples"], sources)
    return PartView(part_id, arrays, offsets, sample_ids, commit, part_sources, dtypes, vocab_size)


def open_cache(path: str | os.PathLike) -> KDCache:
    """Open a complete cache for reading. Raises CacheFormatError / IncompleteCacheError (ValueErrors)."""
    root = Path(path)
    meta = _check_header(root)
    index = meta.get("index") or {}
    entries = index.get("parts")
    if not isinstance(entries, list) or len(entries) != meta.get("num_parts"):
        raise fmt.CacheFormatError(
            f"{root}: index lists {len(entries or [])} parts, metadata says {meta.get('num_parts')}"
        )
    sources = meta.get(fmt.SOURCES_META_KEY) or None  # absent in version-1 caches
    dtypes = StorageDtypes.from_meta(meta)  # CacheFormatError for an encoding this code cannot read
    parts = [_open_part(root, part_id, entry, dtypes, int(meta["vocab_size"]), sources)
             for part_id, entry in enumerate(entries)]
    return KDCache(root, meta, parts)


class KDCache:
    """A complete cache: a sequence of samples ordered by part, then by order within the part.

    `cache[i]` is a dict with sample_id (str), input_ids [T], teacher_input_ids [Tt], label_positions [n],
    teacher_positions [n] (int64), topk_ids [n, K] (int64), topk_logprobs [n, K], label_logprobs [n]
    (float32), when `has_relations`, relations [3, A_r, n, n] (float32), when `has_sources`, source (str), and
    when the cache has temperatures other than 1 (`tempered_temperatures`), log_normalizers [n, M] (float32),
    and when it has sampled targets (`sampled_draws` S > 0), sampled_ids / sampled_counts [n, S] (int64).
    """

    def __init__(self, path: Path, meta: dict[str, Any], parts: list[PartView]) -> None:
        self.path = path
        self.meta = meta
        self.parts = parts
        self.dtypes = StorageDtypes.from_meta(meta)
        # part_starts[k] = global index of part k's first sample; used to map a global index to its part.
        self._part_starts: list[int] = (
            np.concatenate([[0], np.cumsum([len(p.sample_ids) for p in parts])]).astype(int).tolist()
        )
        self.sample_ids: list[str] = [sample_id for part in parts for sample_id in part.sample_ids]
        # Per-sample source names (None for caches that record none, e.g. format version 1).
        self.sample_sources: list[str] | None = (
            [name for part in parts for name in (part.sources or [])] if self.has_sources else None)
        totals = meta["index"]["totals"]
        self.num_tokens: int = int(totals["num_tokens"])
        self.num_teacher_tokens: int = int(totals["num_teacher_tokens"])
        self.num_label_positions: int = int(totals["num_label_positions"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def has_relations(self) -> bool:
        return bool(self.meta.get("relations"))

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Temperatures the cache tempers exactly, 1.0 first ((1.0,) for format versions 1 and 2)."""
        return fmt.cache_temperatures(self.meta)

    @property
    def tempered_temperatures(self) -> tuple[float, ...]:
        """The temperatures other than 1, in the order of each sample's ``log_normalizers`` columns."""
        return fmt.tempered_temperatures(self.meta)

    @property
    def targets(self) -> dict[str, Any]:
        """The cache's targets record: mode ``topk`` (versions 1-3), ``sampled`` or ``both`` (cache_schema/sampled.py)."""
        return dict(self.dtypes.targets or {"mode": "topk"})

    @property
    def sampled_draws(self) -> int:
        """S, the teacher draws per position of each sample's sampled_ids / sampled_counts; 0 without them."""
        return self.dtypes.sampled_draws

    @property
    def has_sources(self) -> bool:
        """True when every sample records its source (format version >= 2 written with ``sources``)."""
        return bool(self.meta.get(fmt.SOURCES_META_KEY))

    @property
    def source_names(self) -> list[str]:
        """The cache's source names (root ``sources``), [] when it records none."""
        return list(self.meta.get(fmt.SOURCES_META_KEY) or [])

    def __len__(self) -> int:
        return self._part_starts[-1]

    def __repr__(self) -> str:
        return f"KDCache({str(self.path)!r}, samples={len(self)}, K={self.top_k}, parts={len(self.parts)})"

    def _locate(self, index: int) -> tuple[int, int]:
        part_index = bisect.bisect_right(self._part_starts, index) - 1
        return part_index, index - self._part_starts[part_index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"cache indices must be integers, got {type(index).__name__}; use read_range for slices")
        length = len(self)
        position = int(index) + length if index < 0 else int(index)
        if not 0 <= position < length:
            raise IndexError(f"sample index {index} out of range for a cache of {length} samples")
        return self.read_range(position, position + 1)[0]

    def read_range(self, start: int, stop: int, skip: Collection[str] = ()) -> list[dict[str, Any]]:
        """Samples [start, stop) in order, reading one contiguous slice per array per part touched.

        ``skip``: keys of :data:`SKIPPABLE_KEYS` to leave out (stage two never needs the teacher's sequence,
        often the longest array: 8 worked examples before the question)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) out of bounds for a cache of {len(self)} samples")
        unknown = set(skip) - set(SKIPPABLE_KEYS)
        if unknown:
            raise ValueError(f"only {SKIPPABLE_KEYS} can be skipped, got {sorted(unknown)}")
        samples: list[dict[str, Any]] = []
        position = start
        while position < stop:
            part_index, local = self._locate(position)
            part = self.parts[part_index]
            local_stop = min(len(part.sample_ids), local + (stop - position))
            block = part.read_block(local, local_stop, skip)
            block_samples = split_block(
                block, part.offsets, local, local_stop, part.sample_ids, self.dtypes.num_relation_heads
            )
            if part.sources is not None:
                for offset, sample in enumerate(block_samples):
                    sample[fmt.SOURCE_KEY] = part.sources[local + offset]
            samples += block_samples
            position += local_stop - local
        return samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for block_start in range(0, len(self), _ITER_BLOCK):
            yield from self.read_range(block_start, min(len(self), block_start + _ITER_BLOCK))

    def bytes_on_disk(self) -> int:
        """Sum of the sizes of every file under the cache directory."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
