"""Temperatures (format version 3): log-normalizers written, read back, validated; version-2 caches still open."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import CacheError, CacheMismatchError, CacheValidationError, CacheWriter, open_cache, validate_cache
from cache_schema.cache_stats import kept_mass_per_position
from pipeline.inspect import cache_summary, format_summary
from tests.cache_schema.sample_factory import VOCAB_SIZE, make_meta, make_parts, write_cache

TEMPERATURES = (0.5, 2.0)


def _with_normalizers(parts, seed=0):
    """Attach log Σ_V p^(1/τ) per position. The factory keeps only the top-K of a random full row, so the
    normalizer is rebuilt from a full row that agrees with the stored top-K: top-K entries plus a tail
    spread evenly over the other V − K ids (a valid distribution whose top-K is the stored one)."""
    out = []
    for part in parts:
        new_part = []
        for sample in part:
            topk = sample["topk_logprobs"].astype(np.float64)  # [n, K]
            rest = VOCAB_SIZE - topk.shape[1]
            tail = np.clip(1 - np.exp(topk).sum(axis=1), 1e-12, None)  # [n]
            columns = [np.log(np.exp(topk / tau).sum(axis=1) + rest * (tail / rest) ** (1 / tau))
                       for tau in TEMPERATURES]
            new_part.append({**sample, "log_normalizers": np.stack(columns, axis=1).astype(np.float32)})
        out.append(new_part)
    return out


def test_log_normalizers_round_trip_and_survive_deep_validation(tmp_path):
    parts = _with_normalizers(make_parts(seed=3, part_sizes=[3, 2]))
    write_cache(tmp_path / "c", parts, temperatures=(2.0, 1.0, 0.5, 2.0))
    cache = open_cache(tmp_path / "c")
    validate_cache(cache, deep=True)
    assert cache.meta["format_version"] == 4
    assert cache.temperatures == (1.0, 0.5, 2.0) and cache.tempered_temperatures == (0.5, 2.0)
    expected = [s["log_normalizers"] for part in parts for s in part]
    for got, want in zip((cache[i]["log_normalizers"] for i in range(len(cache))), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # Exact tempering through the normalizer: the kept mass at τ is Σ exp(lp/τ − c_τ).
    kept = kept_mass_per_position(cache, 2.0)
    topk = np.concatenate([cache[i]["topk_logprobs"] for i in range(len(cache))]).astype(np.float64)  # as stored
    normalizer = np.concatenate([s[:, 1] for s in expected]).astype(np.float64)
    np.testing.assert_allclose(kept, np.exp(topk / 2.0 - normalizer[:, None]).sum(axis=1), rtol=1e-6)
    summary = cache_summary(str(tmp_path / "c"))
    assert summary["temperatures"] == [1.0, 0.5, 2.0] and set(summary["tempered_kept_mass"]) == {"0.5", "2"}
    assert "temperatures     1, 0.5, 2  (tail tempered exactly at each)" in format_summary(summary)


def test_normalizers_are_required_exactly_when_the_cache_has_temperatures(tmp_path):
    with pytest.raises(CacheValidationError, match=r"missing keys \['log_normalizers'\]"):
        write_cache(tmp_path / "a", make_parts(seed=4, part_sizes=[2]), temperatures=TEMPERATURES)
    with pytest.raises(CacheValidationError, match="no temperature other than 1"):
        write_cache(tmp_path / "b", _with_normalizers(make_parts(seed=4, part_sizes=[2])))
    narrow = [[{**s, "log_normalizers": s["log_normalizers"][:, :1]} for s in part]
              for part in _with_normalizers(make_parts(seed=4, part_sizes=[2]))]
    with pytest.raises(CacheValidationError, match=r"expected \[n, M\]"):
        write_cache(tmp_path / "c", narrow, temperatures=TEMPERATURES)


@pytest.mark.parametrize("column, value, problem", [
    (1, -0.5, "wrong sign"),            # τ=2: log Σ p^(1/2) >= 0
    (0, 0.5, "wrong sign"),             # τ=0.5: log Σ p^2 <= 0
    (1, 0.0, "tempered kept mass"),     # τ=2 with too small a normalizer: the top-K would hold > 1
    (0, np.nan, "non-finite"),
])
def test_impossible_normalizers_are_refused(tmp_path, column, value, problem):
    parts = _with_normalizers(make_parts(seed=6, part_sizes=[2]))
    parts[0][0]["log_normalizers"][:, column] = value
    with pytest.raises(CacheValidationError, match=problem):
        write_cache(tmp_path / "c", parts, temperatures=TEMPERATURES)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2", True])
def test_non_positive_temperatures_are_refused(tmp_path, bad):
    with pytest.raises(CacheError, match="temperatures must be finite numbers > 0"):
        CacheWriter(tmp_path / "c", make_meta(), 1, top_k=8, vocab_size=VOCAB_SIZE, temperatures=(1.0, bad))


def test_other_temperatures_make_another_cache(tmp_path):
    write_cache(tmp_path / "c", _with_normalizers(make_parts(seed=7, part_sizes=[1])), temperatures=TEMPERATURES)
    with pytest.raises(CacheMismatchError, match="temperatures"):
        with CacheWriter(tmp_path / "c", make_meta(), 1, top_k=8, vocab_size=VOCAB_SIZE, temperatures=(2.0,)):
            pass


def test_version_2_cache_opens_with_temperature_one_only(tmp_path):
    write_cache(tmp_path / "v2", make_parts(seed=5, part_sizes=[2]))
    root = zarr.open_group(store=str(tmp_path / "v2"), mode="r+", zarr_format=3)
    root.attrs["format_version"] = 2
    del root.attrs["temperatures"]
    cache = open_cache(tmp_path / "v2")
    validate_cache(cache, deep=True)
    assert cache.temperatures == (1.0,) and cache.tempered_temperatures == () and "log_normalizers" not in cache[0]
    # A v2 cache is the same product as a v3 request at τ=1 only: it is reused, not refused.
    with CacheWriter(tmp_path / "v2", make_meta(), 1, top_k=8, vocab_size=VOCAB_SIZE) as writer:
        assert writer.already_complete
