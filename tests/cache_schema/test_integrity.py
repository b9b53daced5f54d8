"""Per-file digests: damaged or missing chunks are errors naming part, array and file; repair finds them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_schema import CacheError, CacheWriter, open_cache, validate_cache
from cache_schema.format import PART_COMMIT_ATTR, part_path
from cache_schema.integrity import DIGESTS_KEY, CacheDamagedError, damaged_parts
from cache_schema.lock import CacheLockedError, CacheWriteLock
from tests.cache_schema.sample_factory import TOP_K, VOCAB_SIZE, make_meta, make_parts, write_cache


@pytest.fixture()
def cache_path(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=50, part_sizes=[3, 2], min_pairs=2))
    return path


def _chunk(path, part_id: int, array: str):
    """The first chunk file of a part's array ([N, K] arrays have two chunk coordinates)."""
    coordinates = ("0", "0") if array.startswith("topk") else ("0",)
    return path.joinpath(part_path(part_id), array, "c", *coordinates)


def _read_everything(path):
    return list(open_cache(path))


def test_commit_records_a_digest_for_every_array_file(cache_path):
    commit = open_cache(cache_path).parts[1].commit
    files = commit[DIGESTS_KEY]["files"]
    arrays = {key.split("/")[0] for key in files}
    assert "topk_ids/zarr.json" in files and "topk_ids/c/0/0" in files
    assert arrays == set(zarr.open_group(store=str(cache_path / part_path(1)), mode="r").array_keys())


def test_flipped_bytes_in_a_chunk_are_damage_naming_part_array_file(cache_path):
    chunk = _chunk(cache_path, 1, "topk_logprobs")
    data = bytearray(chunk.read_bytes())
    data[8:24] = bytes(b ^ 0xFF for b in data[8:24])
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match="part 1, array topk_logprobs, file c/0/0 does not match its checksum"
                                                ".*cache-teacher --repair"):
        _read_everything(cache_path)


def test_truncated_chunk_is_damage_not_a_codec_error(cache_path):
    chunk = _chunk(cache_path, 0, "input_ids")
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(CacheDamagedError, match="part 0, array input_ids, file c/0 does not match"):
        _read_everything(cache_path)


def test_deleted_chunk_is_refused_at_open_never_read_as_fill_value(cache_path):
    _chunk(cache_path, 1, "topk_ids").unlink()
    with pytest.raises(CacheDamagedError, match="part 1, array topk_ids, file c/0/0 is missing"):
        open_cache(cache_path)


def test_parts_without_digests_still_open_and_validate(cache_path):
    """Caches written before digests existed (format v1/v2 of older code) are checked structurally."""
    for part_id in (0, 1):
        group = zarr.open_group(store=str(cache_path / part_path(part_id)), mode="r+", zarr_format=3)
        commit = {k: v for k, v in group.attrs[PART_COMMIT_ATTR].items() if k != DIGESTS_KEY}
        group.attrs.update({PART_COMMIT_ATTR: commit})
    root = zarr.open_group(store=str(cache_path), mode="r+", zarr_format=3)
    index = dict(root.attrs["index"])
    index["parts"] = [{k: v for k, v in entry.items() if k != DIGESTS_KEY} for entry in index["parts"]]
    root.attrs.update({"index": index})
    cache = open_cache(cache_path)
    validate_cache(cache, deep=True)
    assert len(_read_everything(cache_path)) == 5


def test_damaged_parts_lists_exactly_the_damaged_ones(cache_path):
    meta = open_cache(cache_path).meta
    assert damaged_parts(cache_path, meta) == {}
    _chunk(cache_path, 1, "label_logprobs").write_bytes(b"junk")
    assert damaged_parts(cache_path, meta) == {1: "label_logprobs/c/0 does not match its checksum"}


def test_repair_reopens_only_damaged_parts_and_rewrites_them_identically(cache_path):
    parts = make_parts(seed=50, part_sizes=[3, 2], min_pairs=2)
    before = _read_everything(cache_path)
    part0_commit = open_cache(cache_path).parts[0].commit
    _chunk(cache_path, 1, "topk_ids").unlink()
    with CacheWriter(cache_path, make_meta(), 2, top_k=TOP_K, vocab_size=VOCAB_SIZE, repair=True) as writer:
        assert writer.damaged == {1: "topk_ids/c/0/0 is missing"}
        assert writer.pending_parts() == [1]
        writer.write_part(1, parts[1])
        writer.finalize()
    after = open_cache(cache_path)
    assert after.parts[0].commit == part0_commit  # the intact part was not touched
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old["topk_ids"], new["topk_ids"])
    validate_cache(after, deep=True)


def test_second_writer_is_refused_naming_the_holder(cache_path):
    with CacheWriteLock(cache_path):
        owner = json.loads((cache_path / ".kd-writer.owner").read_text())
        refused = pytest.raises(CacheLockedError, match=f"being written by process {owner['pid']} on ")
        with refused, CacheWriter(cache_path, make_meta(), 2, top_k=TOP_K, vocab_size=VOCAB_SIZE):
            pass
    with CacheWriter(cache_path, make_meta(), 2, top_k=TOP_K, vocab_size=VOCAB_SIZE) as writer:
        assert writer.already_complete  # the lock file left behind is free once released


def test_overwrite_refuses_foreign_files_and_deletes_nothing(cache_path):
    run_dir = cache_path / "student-run"
    run_dir.mkdir()
    (run_dir / "final.safetensors").write_bytes(b"weights")
    files_before = sorted(p for p in cache_path.rglob("*"))
    refused = pytest.raises(CacheError, match="holds 1 file\\(s\\) the cache did not write \\(student-run\\)")
    with refused, CacheWriter(cache_path, make_meta(top_k=4), 1, top_k=4, vocab_size=VOCAB_SIZE, overwrite=True):
        pass
    assert sorted(p for p in cache_path.rglob("*")) == files_before


def test_overwrite_removes_only_the_cache_and_keeps_nothing_stale(cache_path):
    with CacheWriter(cache_path, make_meta(top_k=4), 1, top_k=4, vocab_size=VOCAB_SIZE, overwrite=True) as writer:
        assert writer.pending_parts() == [0]
    assert not (cache_path / part_path(1)).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    """kill -9 of the holder leaves the lock file but releases the OS lock: the next writer proceeds."""
    code = ("import sys, time; from cache_schema.lock import CacheWriteLock; "
            f"lock = CacheWriteLock({str(tmp_path / 'cache')!r}).__enter__(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError, match=f"process {holder.pid} "):
            CacheWriteLock(tmp_path / "cache").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with CacheWriteLock(tmp_path / "cache"):
        owner = json.loads((tmp_path / "cache" / ".kd-writer.owner").read_text())
    assert owner["pid"] == os.getpid()
