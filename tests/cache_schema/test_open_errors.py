"""open_cache refuses anything that is not a complete cache of a supported version, with clear messages."""

from __future__ import annotations

import pytest
import zarr

from cache_schema import FORMAT_VERSION, CacheFormatError, open_cache, peek_cache_state
from cache_schema.format import PART_COMMIT_ATTR, part_path
from tests.cache_schema.sample_factory import make_parts, write_cache


def test_missing_path(tmp_path):
    with pytest.raises(CacheFormatError, match="does not exist"):
        open_cache(tmp_path / "nope")
    assert peek_cache_state(tmp_path / "nope") == ("absent", None)


def test_plain_directory_is_not_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CacheFormatError, match="not a kd-topk-cache"):
        open_cache(tmp_path)
    assert peek_cache_state(tmp_path) == ("not_a_cache", None)


def test_other_zarr_group_is_not_a_cache(tmp_path):
    zarr.create_group(store=str(tmp_path / "other"), attributes={"format": "something-else"}, zarr_format=3)
    with pytest.raises(CacheFormatError, match="not a kd-topk-cache"):
        open_cache(tmp_path / "other")


def _set_root_attr(path, key, value):
    zarr.open_group(store=str(path), mode="r+", zarr_format=3).attrs[key] = value


def test_newer_version_is_refused(tmp_path):
    write_cache(tmp_path / "cache", make_parts(seed=30, part_sizes=[1]))
    _set_root_attr(tmp_path / "cache", "format_version", FORMAT_VERSION + 1)
    with pytest.raises(CacheFormatError, match="newer than this code supports"):
        open_cache(tmp_path / "cache")


def test_unknown_version_is_refused(tmp_path):
    write_cache(tmp_path / "cache", make_parts(seed=31, part_sizes=[1]))
    _set_root_attr(tmp_path / "cache", "format_version", "one")
    with pytest.raises(CacheFormatError, match="unknown format_version"):
        open_cache(tmp_path / "cache")


def test_index_disagreeing_with_part_is_refused(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=32, part_sizes=[2, 3]))
    group = zarr.open_group(store=str(path / part_path(1)), mode="r+", zarr_format=3)
    commit = dict(group.attrs[PART_COMMIT_ATTR])
    group.attrs[PART_COMMIT_ATTR] = {**commit, "num_samples": 4}
    with pytest.raises(CacheFormatError, match="part 1 has a commit record that disagrees with the index.*--repair"):
        open_cache(path)


def test_index_with_wrong_part_count_is_refused(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=33, part_sizes=[2, 3]))
    _set_root_attr(path, "num_parts", 3)
    with pytest.raises(CacheFormatError, match="index lists 2 parts, metadata says 3"):
        open_cache(path)
