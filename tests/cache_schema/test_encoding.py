"""Top-K encodings (format version 3): compact rows round-trip (ids exact, logprobs within the stated bound) at
real-vocabulary ids above 65,535 and 131,072; corrupted rows and unknown encodings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import CacheError, CacheFormatError, CacheWriter, cache_stats, open_cache, validate_cache
from cache_schema.encoding import COMPACT_LOGPROB_STEP, decode_rows, encode_rows, encoding_meta
from cache_schema.format import TOPK_ID_DELTAS, part_path
from pipeline.inspect import cache_summary, format_summary
from tests.cache_schema.sample_factory import make_meta, make_parts, write_cache
from tests.helpers.stage_helpers import reseal_cache

REAL_VOCAB = 262_144  # Gemma's: ids above 131,072 (Megatron's ceiling) and 65,535 (uint16)


def _spread_ids(parts, vocab=REAL_VOCAB):
    """Map the factory's ids (< 1000) one-to-one onto high ids, so rows hold ids > 131,072 (order kept)."""
    def lift(ids):
        return np.asarray(ids, dtype=np.int64) * 251 + 11_000
    return [[{**s, "input_ids": lift(s["input_ids"]), "teacher_input_ids": lift(s["teacher_input_ids"]),
              "topk_ids": lift(s["topk_ids"])} for s in part] for part in parts]


def _written(tmp_path, name, encoding, parts):
    write_cache(tmp_path / name, parts, vocab_size=REAL_VOCAB, encoding=encoding)
    cache = open_cache(tmp_path / name)
    validate_cache(cache, deep=True)
    return cache


def test_compact_round_trip_ids_exact_and_logprobs_within_the_bound(tmp_path):
    parts = _spread_ids(make_parts(seed=1, part_sizes=[4, 3]))
    cache = _written(tmp_path, "compact", "compact", parts)
    assert cache.meta["encoding"]["name"] == "compact" and cache.meta["id_dtype"] == "uint32"
    originals = [s for part in parts for s in part]
    assert max(int(s["topk_ids"].max()) for s in originals) > 131_072
    for index, want in enumerate(originals):
        got = cache[index]
        for row in range(len(want["topk_ids"])):
            truth = dict(zip(want["topk_ids"][row].tolist(), want["topk_logprobs"][row].astype(np.float64)))
            assert set(got["topk_ids"][row].tolist()) == set(truth)  # ids exact
            decoded = got["topk_logprobs"][row].astype(np.float64)
            assert np.all(np.diff(decoded) <= 0)  # descending again
            error = np.array([truth[i] for i in got["topk_ids"][row].tolist()]) - decoded
            in_range = np.array([truth[i] for i in got["topk_ids"][row].tolist()]) > decoded[0] - 255 * COMPACT_LOGPROB_STEP
            assert np.all(error[in_range] >= -1e-6) and np.all(error[in_range] < COMPACT_LOGPROB_STEP + 1e-6)
            assert decoded[0] == np.float32(want["topk_logprobs"][row, 0])  # the row top is exact
        for key in ("input_ids", "teacher_input_ids", "label_positions", "teacher_positions", "label_logprobs"):
            np.testing.assert_array_equal(got[key], np.asarray(want[key]).astype(got[key].dtype))


def test_plain_round_trip_is_exact_at_real_vocabulary(tmp_path):
    parts = _spread_ids(make_parts(seed=2, part_sizes=[3]))
    cache = _written(tmp_path, "plain", "plain", parts)
    for index, want in enumerate(s for part in parts for s in part):
        np.testing.assert_array_equal(cache[index]["topk_ids"], want["topk_ids"])


def test_compact_is_smaller_and_stats_report_bytes_per_entry(tmp_path):
    parts = _spread_ids(make_parts(seed=3, part_sizes=[40]))
    plain = cache_stats(_written(tmp_path, "plain", "plain", parts))
    compact = cache_stats(_written(tmp_path, "compact", "compact", parts))
    assert compact["encoding"] == "compact" and plain["encoding"] == "plain"
    assert 0 < compact["bytes_per_kept_entry"] < plain["bytes_per_kept_entry"]
    assert abs(compact["kept_mass"]["mean"] - plain["kept_mass"]["mean"]) < 0.07  # codes never raise the mass
    text = format_summary(cache_summary(str(tmp_path / "compact")))
    assert f"top-K encoding   compact  ({compact['bytes_per_kept_entry']:.2f} bytes per kept" in text


def test_encode_decode_without_a_cache_and_the_ceil_rounding():
    ids = np.array([[70_000, 5, 140_000, 9]])
    logprobs = np.array([[-0.1, -0.5, -1.0, -30.0]])  # descending; the last is beyond 255 steps
    arrays = encode_rows(ids, logprobs, encoding_meta("compact"), np.dtype("uint32"), np.dtype("float16"))
    np.testing.assert_array_equal(arrays[TOPK_ID_DELTAS], [[5, 4, 69_991, 70_000]])
    got_ids, got_lp = decode_rows(arrays, encoding_meta("compact"), 151_936, "test")
    np.testing.assert_array_equal(got_ids, ids)
    # 0.4 and 0.9 nats below the top are 6.4 and 14.4 steps: rounded up to 7 and 15 (never above the truth);
    # 29.9 nats is past 255 steps and saturates.
    np.testing.assert_allclose(got_lp, [[-0.1, -0.1 - 7 / 16, -0.1 - 15 / 16, -0.1 - 255 / 16]], atol=1e-6)


def test_a_corrupted_delta_chunk_is_refused_not_decoded(tmp_path):
    cache = _written(tmp_path, "c", "compact", _spread_ids(make_parts(seed=4, part_sizes=[3])))
    array = zarr.open_array(store=str(cache.path / part_path(0) / TOPK_ID_DELTAS), mode="r+", zarr_format=3)
    broken = array[:]
    broken[0, 1] = 0  # a repeated id
    array[...] = broken
    # The chunk's digest catches it first ...
    with pytest.raises(CacheFormatError, match="topk_id_deltas.*does not match its checksum"):
        open_cache(cache.path)[0]
    # ... and a chunk re-sealed with matching digests (or a cache older than digests) still never decodes
    # into wrong ids.
    reseal_cache(cache.path)
    with pytest.raises(CacheFormatError, match="part 0: topk_id_deltas decodes to ids that are repeated"):
        open_cache(cache.path)[0]
    broken[0, 1] = REAL_VOCAB  # past the vocabulary
    array[...] = broken
    reseal_cache(cache.path)
    with pytest.raises(CacheFormatError, match="outside"):
        open_cache(cache.path)[0]


def test_unknown_encodings_are_refused(tmp_path):
    cache = _written(tmp_path, "c", "compact", _spread_ids(make_parts(seed=5, part_sizes=[1])))
    zarr.open_group(store=str(cache.path), mode="r+", zarr_format=3).attrs["encoding"] = {"name": "zfp"}
    with pytest.raises(CacheFormatError, match="unknown top-K encoding .*zfp.*upgrade cache_schema"):
        open_cache(cache.path)
    with pytest.raises(CacheError, match="encoding must be one of"):
        CacheWriter(tmp_path / "new", make_meta(), 1, top_k=8, vocab_size=REAL_VOCAB, encoding="zip")
