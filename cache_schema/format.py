"""Constants of the kd-topk-cache format (version 3) and its error classes.

Everything a writer and a reader must agree on lives here: the format name and version, the names of the
root/part metadata keys, the names and storage dtypes of the per-part arrays, chunk sizes and the numeric
tolerances used by validation. The full specification is cache_schema/README.md.
"""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "kd-topk-cache"
FORMAT_VERSION = 4
# Version history: 1 = no per-sample source; 2 = optional root `sources` + per-part `source_index`;
# 3 = root `temperatures` + per-part `log_normalizers` for the temperatures other than 1; root `encoding`
#     (`plain` top-K arrays, or `compact`: sorted id deltas + 8-bit logprob codes) (README);
# 4 = root `targets` (`topk` | `sampled` | `both`) + per-part sampled_id_deltas / sampled_counts (sampled.py).

# Root group layout: attributes hold the metadata, `parts/<part_id>` holds one sub-group per part.
PARTS_GROUP = "parts"
PART_ID_WIDTH = 6
MAX_PARTS = 10**PART_ID_WIDTH

# Keys the writer owns in the root attributes; a caller's `meta` may not set them.
WRITER_KEYS = (
    "format",
    "format_version",
    "created_at",
    "completed_at",
    "num_parts",
    "vocab_size",
    "top_k",
    "id_dtype",
    "position_dtype",
    "logprob_dtype",
    "label_logprob_dtype",
    "relations",
    "temperatures",
    "encoding",
    "targets",
    "index",
)
REQUIRED_META_KEYS = ("fingerprints", "logprob_mode", "config")
REQUIRED_FINGERPRINTS = ("teacher", "tokenizer", "data", "prompt")

# Attribute of a part's sub-group written LAST by write_part; its presence is what "committed" means.
PART_COMMIT_ATTR = "kd_part_commit"

# Per-part arrays. Offsets are CSR-style: sample s owns flat rows offsets[s]:offsets[s+1].
SAMPLE_ID_OFFSETS = "sample_id_offsets"  # int64 [S+1] into sample_id_bytes
SAMPLE_ID_BYTES = "sample_id_bytes"  # uint8 [Σ len(utf8(sample_id))]
TOKEN_OFFSETS = "token_offsets"  # int64 [S+1] into input_ids
INPUT_IDS = "input_ids"  # id_dtype [Σ T]
TEACHER_TOKEN_OFFSETS = "teacher_token_offsets"  # int64 [S+1] into teacher_input_ids
TEACHER_INPUT_IDS = "teacher_input_ids"  # id_dtype [Σ Tt]
LABEL_OFFSETS = "label_offsets"  # int64 [S+1] into the label-position axis N
LABEL_POSITIONS = "label_positions"  # int32 [N]
TEACHER_POSITIONS = "teacher_positions"  # int32 [N]
LABEL_LOGPROBS = "label_logprobs"  # float32 [N]
TOPK_IDS = "topk_ids"  # id_dtype [N, K]
TOPK_LOGPROBS = "topk_logprobs"  # logprob_dtype [N, K]
# Encoding `compact` (version 3) stores these three instead of topk_ids / topk_logprobs (cache_schema/encoding.py):
TOPK_ID_DELTAS = "topk_id_deltas"  # uint32 [N, K]: ids sorted ascending, differences (first id as is)
TOPK_LOGPROB_CODES = "topk_logprob_codes"  # uint8 [N, K]: ceil((top - lp) / step), same order as the ids
TOPK_TOP_LOGPROBS = "topk_top_logprobs"  # float32 [N]: each row's largest logprob, exact
RELATION_OFFSETS = "relation_offsets"  # int64 [S+1] into relations (element offsets)
RELATIONS = "relations"  # relations_dtype [Σ 3·A_r·n²], sample s reshaped to [3, A_r, n, n]
SOURCE_INDEX = "source_index"  # int32 [S]: index into the root metadata's `sources` (version 2, optional)
# float32 [N, M]: column m = log Σ_v p_v^(1/τ_m) over the teacher's full vocabulary, for the M temperatures of
# the root `temperatures` other than 1 (version 3; absent when M = 0). The tempered top-K logprobs are
# topk_logprobs / τ_m − log_normalizers[:, m], and the tempered tail mass is one minus their exp-sum: exact.
LOG_NORMALIZERS = "log_normalizers"
# Sampled targets (version 4, cache_schema/sampled.py): S slots per position, unique ids first, then padding.
SAMPLED_ID_DELTAS = "sampled_id_deltas"  # uint32 [N, S]: counted ids ascending as differences, padding 0
SAMPLED_COUNTS = "sampled_counts"  # uint8 [N, S]: draws of each counted id (sum S per row), padding 0

OFFSET_ARRAYS = (SAMPLE_ID_OFFSETS, TOKEN_OFFSETS, TEACHER_TOKEN_OFFSETS, LABEL_OFFSETS)
RELATION_KINDS = ("qq", "kk", "vv")

# Keys of one sample, as given to write_part and as returned by KDCache[i].
SAMPLE_KEYS = (
    "sample_id",
    "input_ids",
    "teacher_input_ids",
    "label_positions",
    "teacher_positions",
    "topk_ids",
    "topk_logprobs",
    "label_logprobs",
)
RELATIONS_KEY = "relations"
SOURCE_KEY = "source"  # a sample's source name (str), present exactly when the cache records sources
SOURCES_META_KEY = "sources"  # root metadata: list of source names, or absent/null (no per-sample source)
LOG_NORMALIZERS_KEY = "log_normalizers"  # a sample's [n, M] normalizers, present exactly when M > 0
ENCODING_META_KEY = "encoding"  # root metadata (version 3): {"name": "plain" | "compact", ...its parameters}
TEMPERATURES_META_KEY = "temperatures"  # root metadata (version 3): the τ the cache can temper exactly, 1.0 first
TARGETS_META_KEY = "targets"  # root metadata (version 4): {"mode": "topk" | "sampled" | "both", S, τ, ...}
SAMPLED_IDS_KEY = "sampled_ids"  # a sample's [n, S] int64 sampled ids, present exactly with sampled targets
SAMPLED_COUNTS_KEY = "sampled_counts"  # a sample's [n, S] int64 counts

OFFSET_DTYPE = np.dtype("int64")
POSITION_DTYPE = np.dtype("int32")
SOURCE_INDEX_DTYPE = np.dtype("int32")
LABEL_LOGPROB_DTYPE = np.dtype("float32")
LOG_NORMALIZER_DTYPE = np.dtype("float32")
LOGPROB_DTYPES = ("float16", "float32")  # zarr has no bfloat16

# Chunk lengths along the flat axes: one topk chunk is 256 KiB at K=64/fp16; a sample read touches
# one or two chunks.
TOKEN_CHUNK = 32768
LABEL_CHUNK = 2048
RELATION_CHUNK = 262144
ZSTD_LEVEL = 3

# Tolerances. Logprobs may be slightly positive after fp16 rounding of values near 0; kept mass
# Σexp(top-K) may exceed 1 by the accumulated fp16 rounding of K entries (≈2e-3 worst case observed).
MAX_LOGPROB = 1e-3
KEPT_MASS_TOLERANCE = {"float16": 4e-3, "float32": 1e-3}
RELATION_ROW_SUM_TOLERANCE = {"float16": 1e-2, "float32": 1e-3}
# log Σ p^(1/τ) is ≥ 0 for τ > 1 and ≤ 0 for τ < 1 (Σ p = 1); fp32 rounding of the sum may cross 0 by this much.
LOG_NORMALIZER_SIGN_TOLERANCE = 1e-4


class CacheError(ValueError):
    """Base class of every error raised by cache_schema."""


class IncompleteCacheError(CacheError):
    """The cache exists but was never finalized (no completion record)."""


class CacheFormatError(CacheError):
    """The path is not a readable kd-topk-cache of a supported version, or its index disagrees with its parts."""


class CacheValidationError(CacheError):
    """A sample or stored array breaks the format's invariants."""


class CacheMismatchError(CacheError):
    """An existing cache was made from other inputs (fingerprints, top_k, layout) than requested."""


def root_record(meta: dict, key: str, field: str, allowed: tuple[str, ...], default: str, what: str) -> dict:
    """The root metadata record ``meta[key]`` (``{field: default}`` when absent), refused (CacheFormatError) when
    its ``field`` is not one of ``allowed``: a cache written by newer code this version cannot read."""
    record = meta.get(key) or {field: default}
    if not isinstance(record, dict) or record.get(field) not in allowed:
        raise CacheFormatError(f"unknown {what} {record!r}; this code reads {list(allowed)} (upgrade cache_schema)")
    return dict(record)


def cache_temperatures(meta: dict) -> tuple[float, ...]:
    """The temperatures a cache can temper exactly, 1.0 first. Versions 1 and 2 stored none: (1.0,)."""
    return tuple(float(t) for t in meta.get(TEMPERATURES_META_KEY) or (1.0,))


def tempered_temperatures(meta: dict) -> tuple[float, ...]:
    """The cache's temperatures other than 1, in the order of the columns of ``log_normalizers``."""
    return tuple(t for t in cache_temperatures(meta) if t != 1.0)


def normalized_temperatures(temperatures) -> list[float]:
    """A writer's ``temperatures`` argument as stored: 1.0 first, then the others ascending, no repeats.

    Raises CacheError for a value that is not a finite number > 0.
    """
    values = []
    for value in temperatures:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise CacheError(f"cache temperatures must be finite numbers > 0, got {value!r}")
        values.append(float(value))
    return [1.0] + sorted(set(values) - {1.0})


def id_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids in [0, vocab_size)."""
    if vocab_size <= 0:
        raise CacheError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("uint16")
    if vocab_size <= 2**32:
        return np.dtype("uint32")
    raise CacheError(f"vocab_size {vocab_size} does not fit in uint32 ids")


def part_name(part_id: int) -> str:
    """Zero-padded directory name of a part, e.g. 3 -> '000003'."""
    return f"{part_id:0{PART_ID_WIDTH}d}"


def part_path(part_id: int) -> str:
    """Path of a part's sub-group relative to the cache root, e.g. 'parts/000003'."""
    return f"{PARTS_GROUP}/{part_name(part_id)}"
