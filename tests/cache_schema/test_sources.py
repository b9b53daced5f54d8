"""Per-sample sources (format version 2): written, read back, validated; version-1 caches still open."""

from __future__ import annotations

import pytest
import zarr

from cache_schema import CacheError, CacheValidationError, cache_stats, open_cache, validate_cache
from pipeline.inspect import cache_summary, format_summary
from tests.cache_schema.sample_factory import make_meta, make_parts, write_cache


def _with_sources(parts, names):
    return [[{**sample, "source": names[(p + i) % len(names)]} for i, sample in enumerate(part)]
            for p, part in enumerate(parts)]


def test_sources_round_trip_and_survive_deep_validation(tmp_path):
    parts = _with_sources(make_parts(seed=3, part_sizes=[3, 2]), ["chat", "code"])
    write_cache(tmp_path / "c", parts, meta=make_meta() | {"sources": ["chat", "code", "unused"]})
    cache = open_cache(tmp_path / "c")
    validate_cache(cache, deep=True)
    expected = [s["source"] for part in parts for s in part]
    assert cache.has_sources and cache.source_names == ["chat", "code", "unused"]
    assert cache.sample_sources == expected == [cache[i]["source"] for i in range(len(cache))]
    per_source = cache_stats(cache)["sources"]
    assert per_source["chat"]["samples"] == expected.count("chat") and per_source["unused"]["samples"] == 0
    assert sum(row["student_tokens"] for row in per_source.values()) == cache.num_tokens
    assert sum(row["distilled_positions"] for row in per_source.values()) == cache.num_label_positions


def test_a_sample_with_an_unknown_or_missing_source_is_refused(tmp_path):
    parts = _with_sources(make_parts(seed=4, part_sizes=[2]), ["web"])
    with pytest.raises(CacheValidationError, match="source 'web' is not one of the cache's sources"):
        write_cache(tmp_path / "a", parts, meta=make_meta() | {"sources": ["chat"]})
    with pytest.raises(CacheValidationError, match="missing keys \\['source'\\]"):
        write_cache(tmp_path / "b", make_parts(seed=4, part_sizes=[2]), meta=make_meta() | {"sources": ["chat"]})
    with pytest.raises(CacheValidationError, match="this cache records no sources"):
        write_cache(tmp_path / "c", parts)
    with pytest.raises(CacheError, match="non-empty list of distinct"):
        write_cache(tmp_path / "d", parts, meta=make_meta() | {"sources": ["web", "web"]})


def test_version_1_cache_without_sources_still_opens(tmp_path):
    write_cache(tmp_path / "v1", make_parts(seed=5, part_sizes=[2]))
    zarr.open_group(store=str(tmp_path / "v1"), mode="r+", zarr_format=3).attrs["format_version"] = 1
    cache = open_cache(tmp_path / "v1")
    validate_cache(cache, deep=True)
    assert not cache.has_sources and cache.sample_sources is None and "source" not in cache[0]
    summary = cache_summary(str(tmp_path / "v1"))
    assert summary["sources"] is None and summary["format_version"] == 1
    assert "sources          not recorded (format version 1 cache)" in format_summary(summary)
