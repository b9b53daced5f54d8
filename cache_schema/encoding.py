"""How a part stores its top-K rows: the ``encoding`` of the cache (root metadata, format version 3).

``plain`` (versions 1-3): ``topk_ids`` [N, K] (id_dtype) and ``topk_logprobs`` [N, K] (logprob_dtype), rows sorted
by descending logprob, zstd.

``compact`` (version 3): per row the K ids are sorted ascending and stored as differences (the first id as is),
``topk_id_deltas`` uint32 [N, K]; the logprobs, in that same id order, as uint8 codes
``topk_logprob_codes`` [N, K] = ceil((top − lp) / step) clamped to 255, with the row's top logprob kept exactly in
``topk_top_logprobs`` float32 [N]. Both [N, K] arrays go through zstd at level 9, which turns the small deltas
and codes into few bits each (measured at Qwen's 151,936-row vocabulary, K=64: ~6.8 bits per id delta and ~4.6
per code; blosc with byte shuffle gave 8.0 bits per id, bit shuffle 12.1). Reading decodes a whole block at once (a cumulative sum, a lookup and a
stable argsort per row; no Python loop per entry) and restores the descending-logprob order; ties keep
ascending id order. Decoded logprobs lie in (lp − step, lp] — never above the true value, so kept mass stays
≤ 1 — except entries more than 255·step below their row's top, stored at top − 255·step (their probability is
below e^(−255·step) of the top's). Ids are exact and unbounded by the id dtype (no vocabulary ceiling); a
decoded id outside [0, vocab_size) or a non-increasing id row is a corrupted chunk and raises CacheFormatError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from zarr.codecs import ZstdCodec

from cache_schema import format as fmt

ENCODINGS = ("plain", "compact")
"""``cache.encoding``: how the top-K rows are stored (see the module docstring and cache_schema/README.md)."""
COMPACT_LOGPROB_STEP = 1.0 / 16.0
"""Quantization step of compact logprob codes (nats): decoded values are at most this much below the truth."""
_MAX_CODE = 255
COMPACT_ZSTD_LEVEL = 9
"""zstd level of the compact [N, K] arrays: decoding speed does not depend on it, stage one's writes barely."""
ID_DELTA_DTYPE = np.dtype("uint32")
LOGPROB_CODE_DTYPE = np.dtype("uint8")
TOP_LOGPROB_DTYPE = np.dtype("float32")

PLAIN_ARRAYS = (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS)
COMPACT_ARRAYS = (fmt.TOPK_ID_DELTAS, fmt.TOPK_LOGPROB_CODES, fmt.TOPK_TOP_LOGPROBS)


def encoding_meta(name: str) -> dict[str, Any]:
    """The root ``encoding`` record the writer stores for ``name`` (CacheError for an unknown one)."""
    if name not in ENCODINGS:
        raise fmt.CacheError(f"encoding must be one of {ENCODINGS}, got {name!r}")
    if name == "plain":
        return {"name": "plain"}
    return {"name": "compact", "id_coding": "sorted_delta_uint32", "logprob_step": COMPACT_LOGPROB_STEP,
            "logprob_error": f"decoded in (lp - {COMPACT_LOGPROB_STEP}, lp]; entries below top - "
                             f"{_MAX_CODE * COMPACT_LOGPROB_STEP} nats stored at that floor",
            "codec": f"zstd level {COMPACT_ZSTD_LEVEL}"}


def cache_encoding(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The encoding record of a cache (``plain`` for versions 1-2); CacheFormatError for one this code lacks."""
    return fmt.root_record(dict(meta), fmt.ENCODING_META_KEY, "name", ENCODINGS, "plain", "top-K encoding")


def topk_array_names(encoding: Mapping[str, Any]) -> tuple[str, ...]:
    """The arrays a part of this encoding stores for its top-K rows, in checksum order."""
    return COMPACT_ARRAYS if encoding["name"] == "compact" else PLAIN_ARRAYS


def compressors_for(name: str) -> Any:
    """The zarr compressor of one array: zstd, at a higher level for the compact top-K rows and sampled targets."""
    if name in (fmt.TOPK_ID_DELTAS, fmt.TOPK_LOGPROB_CODES, fmt.SAMPLED_ID_DELTAS, fmt.SAMPLED_COUNTS):
        return ZstdCodec(level=COMPACT_ZSTD_LEVEL)
    return ZstdCodec(level=fmt.ZSTD_LEVEL)


def encode_rows(topk_ids: np.ndarray, topk_logprobs: np.ndarray, encoding: Mapping[str, Any],
                id_dtype: np.dtype, logprob_dtype: np.dtype) -> dict[str, np.ndarray]:
    """topk_ids [N, K] int64, topk_logprobs [N, K] float (descending per row) -> the part's top-K arrays."""
    if encoding["name"] == "plain":
        with np.errstate(over="ignore"):  # float16 overflow becomes inf; the writer checks and refuses it
            return {fmt.TOPK_IDS: topk_ids.astype(id_dtype), fmt.TOPK_LOGPROBS: topk_logprobs.astype(logprob_dtype)}
    order = np.argsort(topk_ids, axis=1, kind="stable")  # [N, K] ascending ids
    ids = np.take_along_axis(topk_ids, order, axis=1)
    logprobs = np.take_along_axis(topk_logprobs.astype(np.float64), order, axis=1)
    top = topk_logprobs[:, :1].astype(np.float64) if topk_logprobs.shape[1] else np.zeros((len(ids), 1))
    step = float(encoding["logprob_step"])
    # ceil: the decoded value never exceeds the true one (kept mass stays <= 1); the top itself is code 0.
    codes = np.clip(np.ceil((top - logprobs) / step - 1e-9), 0, _MAX_CODE)
    deltas = np.diff(ids, axis=1, prepend=0)
    return {fmt.TOPK_ID_DELTAS: deltas.astype(ID_DELTA_DTYPE), fmt.TOPK_LOGPROB_CODES: codes.astype(LOGPROB_CODE_DTYPE),
            fmt.TOPK_TOP_LOGPROBS: top[:, 0].astype(TOP_LOGPROB_DTYPE)}


def decode_rows(arrays: Mapping[str, np.ndarray], encoding: Mapping[str, Any], vocab_size: int,
                where: str) -> tuple[np.ndarray, np.ndarray]:
    """A block's top-K arrays -> (topk_ids [r, K] int64, topk_logprobs [r, K] float32), rows descending.

    For ``compact``, a row whose ids are not strictly increasing or leave [0, vocab_size) raises
    CacheFormatError naming ``where``: a corrupted chunk, never returned as wrong ids.
    """
    if encoding["name"] == "plain":
        return arrays[fmt.TOPK_IDS].astype(np.int64), arrays[fmt.TOPK_LOGPROBS].astype(np.float32)
    deltas = arrays[fmt.TOPK_ID_DELTAS].astype(np.int64)  # [r, K]
    ids = np.cumsum(deltas, axis=1)
    if ids.size and (np.any(deltas[:, 1:] <= 0) or ids[:, -1].max() >= vocab_size):
        raise fmt.CacheFormatError(f"{where}: {fmt.TOPK_ID_DELTAS} decodes to ids that are repeated or outside "
                                   f"[0, {vocab_size}); the chunk is corrupted, rebuild the cache")
    step = float(encoding["logprob_step"])
    top = arrays[fmt.TOPK_TOP_LOGPROBS].astype(np.float64)[:, None]  # [r, 1]
    logprobs = (top - arrays[fmt.TOPK_LOGPROB_CODES].astype(np.float64) * step).astype(np.float32)
    order = np.argsort(-logprobs, axis=1, kind="stable")  # descending logprob; ties keep ascending id
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)
