"""Sampled targets (format version 4): round trip at real-vocabulary ids above 65,535 and 131,072, `both` beside
the top-K, sampled-only caches (K = 0), and corrupted or invalid sampled rows refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import CacheError, CacheFormatError, CacheValidationError, open_cache, validate_cache
from cache_schema.format import SAMPLED_COUNTS, part_path
from cache_schema.sampled import cache_targets, targets_meta
from tests.cache_schema.sample_factory import make_meta, make_parts, write_cache
from tests.helpers.stage_helpers import reseal_cache

REAL_VOCAB = 151_936
DRAWS = 24


def _lift(ids):
    return np.asarray(ids, dtype=np.int64) * 151 + 1_000  # factory ids < 1000 -> up to ~152k, order kept


def _with_draws(parts, keep_topk: bool, seed: int = 0):
    """Each sample gets S draws per position (unique ids ascending + counts, zero-count padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for part in parts:
        samples = []
        for s in part:
            n = len(s["label_positions"])
            drawn = np.sort(_lift(rng.integers(0, 1000, size=(n, DRAWS)) % 37 * 27), axis=1)  # repeats on purpose
            ids = np.zeros((n, DRAWS), np.int64)
            counts = np.zeros((n, DRAWS), np.int64)
            for row in range(n):
                unique, count = np.unique(drawn[row], return_counts=True)
                ids[row, :unique.size], counts[row, :unique.size] = unique, count
                ids[row, unique.size:] = unique[-1]
            sample = {**s, "input_ids": _lift(s["input_ids"]), "teacher_input_ids": _lift(s["teacher_input_ids"]),
                      "topk_ids": _lift(s["topk_ids"]), "sampled_ids": ids, "sampled_counts": counts}
            if not keep_topk:
                sample["topk_ids"] = sample["topk_ids"][:, :0]
                sample["topk_logprobs"] = sample["topk_logprobs"][:, :0]
            samples.append(sample)
        out.append(samples)
    return out


@pytest.mark.parametrize("mode", ["sampled", "both"])
def test_sampled_targets_round_trip_at_real_vocabulary(tmp_path, mode):
    parts = _with_draws(make_parts(seed=3, part_sizes=[4, 3]), keep_topk=mode == "both")
    top_k = 8 if mode == "both" else 0
    write_cache(tmp_path / mode, parts, top_k=top_k, vocab_size=REAL_VOCAB, meta=make_meta(top_k=top_k),
                targets=mode, samples_per_position=DRAWS, sample_temperature=2.0)
    cache = open_cache(tmp_path / mode)
    validate_cache(cache, deep=True)
    assert cache.meta["format_version"] == 4 and cache.sampled_draws == DRAWS
    assert cache.targets["mode"] == mode and cache.targets["temperature"] == 2.0
    originals = [s for part in parts for s in part]
    assert max(int(s["sampled_ids"].max()) for s in originals) > 131_072
    for index, want in enumerate(originals):
        got = cache[index]
        np.testing.assert_array_equal(got["sampled_ids"], want["sampled_ids"])
        np.testing.assert_array_equal(got["sampled_counts"], want["sampled_counts"])
        np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
        assert got["topk_ids"].shape == (len(want["label_positions"]), top_k)


def test_topk_cache_reads_without_sampled_targets(tmp_path):
    write_cache(tmp_path / "c", make_parts(seed=4, part_sizes=[2]))
    cache = open_cache(tmp_path / "c")
    assert cache.sampled_draws == 0 and cache.targets == {"mode": "topk"} and "sampled_ids" not in cache[0]


def test_a_corrupted_sampled_chunk_is_refused_never_decoded(tmp_path):
    parts = _with_draws(make_parts(seed=5, part_sizes=[3]), keep_topk=False)
    write_cache(tmp_path / "c", parts, top_k=0, vocab_size=REAL_VOCAB, meta=make_meta(top_k=0), targets="sampled",
                samples_per_position=DRAWS)
    counts = zarr.open_array(store=str(tmp_path / "c" / part_path(0) / SAMPLED_COUNTS), mode="r+")
    values = counts[:]
    values[0, 0] += 1  # counts of row 0 now sum to S + 1
    counts[...] = values
    reseal_cache(tmp_path / "c")
    with pytest.raises(CacheFormatError, match="do not sum to S=24"):
        open_cache(tmp_path / "c")[0]


def test_invalid_sampled_samples_and_modes_are_refused(tmp_path):
    parts = _with_draws(make_parts(seed=6, part_sizes=[1]), keep_topk=False)
    parts[0][0]["sampled_counts"][0, 0] += 1
    with pytest.raises(CacheValidationError, match="do not sum to S"):
        write_cache(tmp_path / "a", parts, top_k=0, vocab_size=REAL_VOCAB, meta=make_meta(top_k=0),
                    targets="sampled", samples_per_position=DRAWS)
    with pytest.raises(CacheError, match="samples_per_position must be an integer in"):
        targets_meta("sampled", 0)
    with pytest.raises(CacheError, match="targets must be one of"):
        targets_meta("dense")
    with pytest.raises(CacheError, match="top_k must be 0 with targets=sampled"):
        write_cache(tmp_path / "b", parts, top_k=8, targets="sampled", samples_per_position=DRAWS)
    with pytest.raises(CacheFormatError, match="unknown targets"):
        cache_targets({"targets": {"mode": "dense"}})


def _edit_root(path, **changes):
    root = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    attrs = dict(root.attrs)
    for key, value in changes.items():
        attrs.pop(key, None) if value is None else attrs.update({key: value})
    root.attrs.put(attrs)


def test_a_version_3_cache_reads_as_topk(tmp_path):
    write_cache(tmp_path / "c", make_parts(seed=7, part_sizes=[2]))
    _edit_root(tmp_path / "c", targets=None, format_version=3)  # what version-3 code wrote
    cache = open_cache(tmp_path / "c")
    assert cache.targets == {"mode": "topk"} and cache.sampled_draws == 0 and cache[1]["topk_ids"].shape[1] == 8


def test_a_cache_with_an_unknown_targets_mode_is_refused_at_open(tmp_path):
    write_cache(tmp_path / "c", make_parts(seed=8, part_sizes=[1]))
    _edit_root(tmp_path / "c", targets={"mode": "dense"})
    with pytest.raises(CacheFormatError, match="unknown targets .*upgrade cache_schema"):
        open_cache(tmp_path / "c")
