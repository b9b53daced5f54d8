"""How the samples of one part map to its flat arrays and back (both directions live here so they stay
symmetric), plus the part checksum recorded in the commit record.

A part with S samples, N distilled positions in total and top-K width K stores (see format.py for names):
  *_offsets [S+1] (int64, CSR) and flat arrays: input_ids [ΣT], teacher_input_ids [ΣTt], label_positions,
  teacher_positions, label_logprobs [N], topk_ids, topk_logprobs [N, K], sample_id_bytes [Σ bytes] and,
  with relations, relations [Σ 3·A_r·n²]; with M temperatures other than 1 (version 3), log_normalizers [N, M];
  with S sampled draws per position (version 4), sampled_id_deltas / sampled_counts [N, S].
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_schema import format as fmt
from cache_schema.encoding import cache_encoding, encode_rows, topk_array_names
from cache_schema.sampled import SAMPLED_ARRAYS, cache_targets, encode_sampled, sampled_draws

_ID_BYTES_CHUNK = 1 << 20


@dataclass(frozen=True)
class StorageDtypes:
    """On-disk dtypes of one cache, recorded in its root metadata."""

    ids: np.dtype
    positions: np.dtype
    logprobs: np.dtype
    label_logprobs: np.dtype
    relations: np.dtype | None
    num_relation_heads: int | None
    sources: tuple[str, ...] | None = None
    """Source names of the cache (root ``sources``); None: samples carry no source and there is no source_index."""
    tempered: tuple[float, ...] = ()
    """The cache's temperatures other than 1 (one ``log_normalizers`` column each); () means no such array."""
    encoding: dict[str, Any] | None = None
    """The cache's top-K encoding record (cache_schema/encoding.py); None means ``plain``."""
    targets: dict[str, Any] | None = None
    """The cache's targets record (cache_schema/sampled.py); None means ``topk``."""

    @property
    def sampled_draws(self) -> int:
        """S, the draws per position of the sampled targets; 0 when the cache stores none."""
        return sampled_draws(self.targets)

    @property
    def topk_encoding(self) -> dict[str, Any]:
        return self.encoding or {"name": "plain"}

    def array_names(self) -> tuple[str, ...]:
        """Every array a part of this cache has, in the fixed write / checksum order."""
        return array_order(self.relations is not None, self.sources is not None, bool(self.tempered),
                           topk_array_names(self.topk_encoding)) + (SAMPLED_ARRAYS if self.sampled_draws else ())

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> StorageDtypes:
        relations = meta.get("relations")
        return cls(
            ids=np.dtype(meta["id_dtype"]),
            positions=np.dtype(meta["position_dtype"]),
            logprobs=np.dtype(meta["logprob_dtype"]),
            label_logprobs=np.dtype(meta["label_logprob_dtype"]),
            relations=np.dtype(relations["dtype"]) if relations else None,
            num_relation_heads=int(relations["num_relation_heads"]) if relations else None,
            sources=tuple(meta[fmt.SOURCES_META_KEY]) if meta.get(fmt.SOURCES_META_KEY) else None,
            tempered=fmt.tempered_temperatures(meta),
            encoding=cache_encoding(meta),
            targets=cache_targets(meta),
        )


def array_order(has_relations: bool, has_sources: bool = False, has_normalizers: bool = False,
                topk_arrays: tuple[str, ...] = (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS)) -> tuple[str, ...]:
    """Names of a part's arrays in the fixed order used for writing and checksumming (``topk_arrays``: those
    of the cache's encoding, in place of topk_ids / topk_logprobs)."""
    names = (
        fmt.SAMPLE_ID_OFFSETS,
        fmt.SAMPLE_ID_BYTES,
        fmt.TOKEN_OFFSETS,
        fmt.INPUT_IDS,
        fmt.TEACHER_TOKEN_OFFSETS,
        fmt.TEACHER_INPUT_IDS,
        fmt.LABEL_OFFSETS,
        fmt.LABEL_POSITIONS,
        fmt.TEACHER_POSITIONS,
        fmt.LABEL_LOGPROBS,
        *topk_arrays,
    )
    return (names + ((fmt.RELATION_OFFSETS, fmt.RELATIONS) if has_relations else ())
            + ((fmt.SOURCE_INDEX,) if has_sources else ()) + ((fmt.LOG_NORMALIZERS,) if has_normalizers else ()))


def chunk_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of an array: offsets in one chunk (read whole at open), flat axes in fixed-size chunks."""
    if name in fmt.OFFSET_ARRAYS or name in (fmt.RELATION_OFFSETS, fmt.SOURCE_INDEX):
        return (max(1, shape[0]),)
    if name in (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.LOG_NORMALIZERS, fmt.TOPK_ID_DELTAS, fmt.TOPK_LOGPROB_CODES,
                fmt.SAMPLED_ID_DELTAS, fmt.SAMPLED_COUNTS):
        return (fmt.LABEL_CHUNK, max(1, shape[1]))  # K = 0 in a sampled-only cache
    if name == fmt.TOPK_TOP_LOGPROBS:
        return (fmt.LABEL_CHUNK,)
    if name == fmt.SAMPLE_ID_BYTES:
        return (_ID_BYTES_CHUNK,)
    if name == fmt.RELATIONS:
        return (fmt.RELATION_CHUNK,)
    return (fmt.TOKEN_CHUNK,)


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=fmt.OFFSET_DTYPE)
    np.cumsum(np.asarray(lengths, dtype=fmt.OFFSET_DTYPE), out=offsets[1:])
    return offsets


def _concat(arrays: Sequence[np.ndarray], dtype: np.dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    if not arrays or 0 in tail_shape:  # [n, 0] rows (a sampled-only cache's top-K) cannot reshape to (-1, 0)
        return np.zeros((sum(len(a) for a in arrays),) + tail_shape, dtype=dtype)
    with np.errstate(over="ignore"):  # float16 overflow becomes inf here; the writer checks and refuses it
        return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]).reshape((-1,) + tail_shape)


def pack_samples(samples: Sequence[Mapping[str, Any]], dtypes: StorageDtypes, top_k: int) -> dict[str, np.ndarray]:
    """Flatten coerced, validated samples into a part's arrays, cast to the storage dtypes."""
    id_bytes = [s["sample_id"].encode("utf-8") for s in samples]
    packed = {
        fmt.SAMPLE_ID_OFFSETS: _offsets([len(b) for b in id_bytes]),
        fmt.SAMPLE_ID_BYTES: np.frombuffer(b"".join(id_bytes), dtype=np.uint8).copy(),
        fmt.TOKEN_OFFSETS: _offsets([len(s["input_ids"]) for s in samples]),
        fmt.INPUT_IDS: _concat([s["input_ids"] for s in samples], dtypes.ids),
        fmt.TEACHER_TOKEN_OFFSETS: _offsets([len(s["teacher_input_ids"]) for s in samples]),
        fmt.TEACHER_INPUT_IDS: _concat([s["teacher_input_ids"] for s in samples], dtypes.ids),
        fmt.LABEL_OFFSETS: _offsets([len(s["label_positions"]) for s in samples]),
        fmt.LABEL_POSITIONS: _concat([s["label_positions"] for s in samples], dtypes.positions),
        fmt.TEACHER_POSITIONS: _concat([s["teacher_positions"] for s in samples], dtypes.positions),
        fmt.LABEL_LOGPROBS: _concat([s["label_logprobs"] for s in samples], dtypes.label_logprobs),
        **encode_rows(_concat([s["topk_ids"] for s in samples], np.int64, (top_k,)),
                      _concat([s["topk_logprobs"] for s in samples], np.float64, (top_k,)),  # one rounding
                      dtypes.topk_encoding, dtypes.ids, dtypes.logprobs),
    }
    if dtypes.relations is not None:
        flat = [np.asarray(s[fmt.RELATIONS_KEY]).reshape(-1) for s in samples]
        packed[fmt.RELATION_OFFSETS] = _offsets([f.size for f in flat])
        packed[fmt.RELATIONS] = _concat(flat, dtypes.relations)
    if dtypes.tempered:
        packed[fmt.LOG_NORMALIZERS] = _concat([s[fmt.LOG_NORMALIZERS_KEY] for s in samples], fmt.LOG_NORMALIZER_DTYPE,
                                              (len(dtypes.tempered),))
    if dtypes.sampled_draws:
        draws = dtypes.sampled_draws
        packed.update(encode_sampled(_concat([s[fmt.SAMPLED_IDS_KEY] for s in samples], np.int64, (draws,)),
                                     _concat([s[fmt.SAMPLED_COUNTS_KEY] for s in samples], np.int64, (draws,))))
    if dtypes.sources is not None:
        position = {name: i for i, name in enumerate(dtypes.sources)}
        packed[fmt.SOURCE_INDEX] = np.asarray([position[s[fmt.SOURCE_KEY]] for s in samples],
                                              dtype=fmt.SOURCE_INDEX_DTYPE)
    return packed


def part_checksum(arrays: Mapping[str, Any], names: Sequence[str], block_rows: int = 1 << 16) -> str:
    """sha256 (hex) over every array's name, dtype, shape and little-endian bytes, in the order of ``names``
    (``StorageDtypes.array_names()``).

    `arrays` maps names to numpy arrays (writer) or zarr arrays (validation); rows are hashed in blocks so
    a large part never has to be in memory at once.
    """
    digest = hashlib.sha256()
    for name in names:
        array = arrays[name]
        little = np.dtype(array.dtype).newbyteorder("<")
        digest.update(f"{name}:{little.str}:{tuple(array.shape)};".encode())
        for start in range(0, array.shape[0], block_rows):
            digest.update(np.ascontiguousarray(array[start : start + block_rows], dtype=little).tobytes())
    return digest.hexdigest()


def decode_sample_ids(id_offsets: np.ndarray, id_bytes: np.ndarray) -> list[str]:
    """Sample ids of a part from sample_id_offsets [S+1] and sample_id_bytes [Σ bytes]."""
    raw = id_bytes.tobytes()
    return [raw[id_offsets[s] : id_offsets[s + 1]].decode("utf-8") for s in range(len(id_offsets) - 1)]


@dataclass(frozen=True)
class PartOffsets:
    """A part's offset arrays, kept in memory by the reader. Each is int64 [S+1]."""

    tokens: np.ndarray
    teacher_tokens: np.ndarray
    labels: np.ndarray
    relations: np.ndarray | None


def split_block(
    block: Mapping[str, np.ndarray],
    offsets: PartOffsets,
    first: int,
    stop: int,
    sample_ids: Sequence[str],
    num_relation_heads: int | None,
) -> list[dict[str, Any]]:
    """Cut the flat arrays read for local samples [first, stop) of a part into per-sample dicts.

    `block[name]` holds the rows offsets[first]:offsets[stop] of each flat array. Returned arrays: ids and
    positions int64, logprobs, relations and log_normalizers float32; relations [3, A_r, n, n].
    """
    samples = []
    for s in range(first, stop):
        labels = (offsets.labels[s] - offsets.labels[first], offsets.labels[s + 1] - offsets.labels[first])
        sample = {
            "sample_id": sample_ids[s],
            "input_ids": _rows(block[fmt.INPUT_IDS], offsets.tokens, first, s).astype(np.int64),
            "label_positions": block[fmt.LABEL_POSITIONS][labels[0] : labels[1]].astype(np.int64),
            "topk_ids": block[fmt.TOPK_IDS][labels[0] : labels[1]].astype(np.int64),
            "topk_logprobs": block[fmt.TOPK_LOGPROBS][labels[0] : labels[1]].astype(np.float32),
            "label_logprobs": block[fmt.LABEL_LOGPROBS][labels[0] : labels[1]].astype(np.float32),
        }
        if fmt.TEACHER_INPUT_IDS in block:  # a reader may skip the teacher's side (stage two does)
            sample["teacher_input_ids"] = _rows(block[fmt.TEACHER_INPUT_IDS], offsets.teacher_tokens, first,
                                                s).astype(np.int64)
        if fmt.TEACHER_POSITIONS in block:
            sample["teacher_positions"] = block[fmt.TEACHER_POSITIONS][labels[0] : labels[1]].astype(np.int64)
        if fmt.SAMPLED_IDS_KEY in block:  # decoded by the reader from sampled_id_deltas
            sample[fmt.SAMPLED_IDS_KEY] = block[fmt.SAMPLED_IDS_KEY][labels[0] : labels[1]]
            sample[fmt.SAMPLED_COUNTS_KEY] = block[fmt.SAMPLED_COUNTS_KEY][labels[0] : labels[1]]
        if fmt.LOG_NORMALIZERS in block:
            sample[fmt.LOG_NORMALIZERS_KEY] = block[fmt.LOG_NORMALIZERS][labels[0] : labels[1]].astype(np.float32)
        if offsets.relations is not None:
            n = sample["label_positions"].shape[0]
            flat = _rows(block[fmt.RELATIONS], offsets.relations, first, s).astype(np.float32)
            shape = (len(fmt.RELATION_KINDS), num_relation_heads, n, n)
            if flat.size != int(np.prod(shape)):
                raise fmt.CacheFormatError(
                    f"sample {sample_ids[s]!r}: relation_offsets give {flat.size} values, expected {shape}; "
                    "the cache is corrupt, rebuild it"
                )
            sample[fmt.RELATIONS_KEY] = flat.reshape(shape)
        samples.append(sample)
    return samples


def _rows(flat: np.ndarray, bounds: np.ndarray, first: int, s: int) -> np.ndarray:
    """Rows of local sample s in a block read starting at local sample `first`."""
    base = bounds[first]
    return flat[bounds[s] - base : bounds[s + 1] - base]
