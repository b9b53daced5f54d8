"""Parts, commits and completion: crashes leave nothing visible, resumes rewrite garbage, workers don't collide."""

from __future__ import annotations

import multiprocessing
import shutil

import numpy as np
import pytest
import zarr

from cache_schema import (
    CacheError,
    CacheWriter,
    IncompleteCacheError,
    open_cache,
    peek_cache_state,
    validate_cache,
    write_part,
)
from cache_schema.format import PART_COMMIT_ATTR, part_path
from tests.cache_schema.sample_factory import TOP_K, VOCAB_SIZE, make_meta, make_parts


def _writer(path, num_parts, **kwargs):
    return CacheWriter(path, make_meta(), num_parts, top_k=TOP_K, vocab_size=VOCAB_SIZE, **kwargs)


def _uncommit(path, part_id):
    """Simulate a crash after the arrays were written but before the commit record."""
    group = zarr.open_group(store=str(path / part_path(part_id)), mode="r+", zarr_format=3)
    del group.attrs[PART_COMMIT_ATTR]


def test_uncommitted_part_is_pending_and_rewritten(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=10, part_sizes=[3, 4])
    with _writer(path, 2) as writer:
        assert writer.pending_parts() == [0, 1]
        write_part(path, 0, parts[0])
        write_part(path, 1, make_parts(seed=99, part_sizes=[2])[0])  # stale data from a "crashed" run
        _uncommit(path, 1)
    assert peek_cache_state(path)[0] == "incomplete"

    with _writer(path, 2) as resumed:  # a re-run: same fingerprints, resumes
        assert not resumed.already_complete
        assert resumed.pending_parts() == [1]
        assert not (path / part_path(1)).exists()  # uncommitted leftovers removed
        write_part(path, 1, parts[1])
        resumed.finalize()
    cache = open_cache(path)
    assert cache.sample_ids == [s["sample_id"] for part in parts for s in part]
    np.testing.assert_array_equal(cache[3]["input_ids"], parts[1][0]["input_ids"])


def test_write_part_replaces_uncommitted_leftovers_itself(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=11, part_sizes=[2])
    with _writer(path, 1) as writer:
        write_part(path, 0, make_parts(seed=12, part_sizes=[5])[0])
        _uncommit(path, 0)
        write_part(path, 0, parts[0])
        writer.finalize()
    assert open_cache(path).sample_ids == ["p0-s0", "p0-s1"]


def test_missing_completion_record_refuses_to_open(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, 2) as writer:
        write_part(path, 0, make_parts(seed=13, part_sizes=[2])[0])
        with pytest.raises(IncompleteCacheError, match=r"1 of 2 part\(s\) not committed"):
            writer.finalize()
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        open_cache(path)
    assert peek_cache_state(path)[0] == "incomplete"


def test_all_parts_committed_but_not_finalized_is_incomplete(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, 1):
        write_part(path, 0, make_parts(seed=14, part_sizes=[2])[0])
    with pytest.raises(IncompleteCacheError):
        open_cache(path)


def test_committed_part_is_never_overwritten(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=15, part_sizes=[2])
    with _writer(path, 1) as writer:
        write_part(path, 0, parts[0])
        with pytest.raises(CacheError, match="already committed"):
            write_part(path, 0, make_parts(seed=16, part_sizes=[3])[0])
        writer.finalize()
    assert open_cache(path).sample_ids == ["p0-s0", "p0-s1"]
    with pytest.raises(CacheError, match="already complete"):
        write_part(path, 0, parts[0])


def test_complete_cache_with_same_fingerprints_is_already_complete(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, 1) as writer:
        write_part(path, 0, make_parts(seed=17, part_sizes=[2])[0])
        writer.finalize()
    completed_at = open_cache(path).meta["completed_at"]
    with _writer(path, 1) as again:
        assert again.already_complete
        assert again.pending_parts() == []
        assert again.finalize()["totals"]["num_samples"] == 2
    assert open_cache(path).meta["completed_at"] == completed_at


def _write_part_in_child(path: str, part_id: int, seed: int, barrier) -> None:
    parts = make_parts(seed=seed, part_sizes=[40, 40])
    barrier.wait(timeout=60)  # both children start writing at the same moment
    write_part(path, part_id, parts[part_id])


def test_two_processes_write_different_parts_concurrently(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, 2) as writer:
        context = multiprocessing.get_context("spawn")  # fork would copy zarr's event-loop thread state
        barrier = context.Barrier(2)
        workers = [
            context.Process(target=_write_part_in_child, args=(str(path), part_id, 21, barrier)) for part_id in (0, 1)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        writer.finalize()
    cache = open_cache(path)
    expected = [s for part in make_parts(seed=21, part_sizes=[40, 40]) for s in part]
    assert len(cache) == 80
    for read, sample in zip(cache, expected, strict=True):
        assert read["sample_id"] == sample["sample_id"]
        np.testing.assert_array_equal(read["topk_ids"], sample["topk_ids"])
        np.testing.assert_array_equal(read["teacher_input_ids"], sample["teacher_input_ids"])
    validate_cache(cache, deep=True)


def test_deleted_part_after_completion_fails_to_open(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, 2) as writer:
        for part_id, samples in enumerate(make_parts(seed=18, part_sizes=[2, 2])):
            write_part(path, part_id, samples)
        writer.finalize()
    shutil.rmtree(path / part_path(1))
    with pytest.raises(CacheError, match="part 1"):
        open_cache(path)
