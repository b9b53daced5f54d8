"""Write caches with ragged random samples and read them back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cache_schema import FORMAT_NAME, FORMAT_VERSION, cache_stats, open_cache, peek_cache_state, validate_cache
from tests.cache_schema.sample_factory import NUM_RELATION_HEADS, TOP_K, VOCAB_SIZE, make_meta, make_parts, write_cache

INT_KEYS = ("input_ids", "teacher_input_ids", "label_positions", "teacher_positions", "topk_ids")


def assert_sample_equal(read: dict, written: dict, logprob_dtype: str) -> None:
    assert read["sample_id"] == written["sample_id"]
    assert isinstance(read["sample_id"], str)
    for key in INT_KEYS:
        assert read[key].dtype == np.int64, key
        np.testing.assert_array_equal(read[key], written[key], err_msg=key)
    assert read["topk_logprobs"].dtype == np.float32
    expected_topk = written["topk_logprobs"].astype(logprob_dtype).astype(np.float32)
    np.testing.assert_array_equal(read["topk_logprobs"], expected_topk)
    np.testing.assert_array_equal(read["label_logprobs"], written["label_logprobs"].astype(np.float32))


@pytest.mark.parametrize("logprob_dtype", ["float16", "float32"])
def test_round_trip_three_ragged_parts(tmp_path, logprob_dtype):
    parts = make_parts(seed=1, part_sizes=[5, 0, 7])  # includes an empty part
    write_cache(tmp_path / "cache", parts, logprob_dtype=logprob_dtype)
    cache = open_cache(tmp_path / "cache")
    written = [sample for part in parts for sample in part]

    assert len(cache) == 12
    assert cache.sample_ids == [s["sample_id"] for s in written]
    for index, sample in enumerate(written):
        read = cache[index]
        assert set(read) == {"sample_id", *INT_KEYS, "topk_logprobs", "label_logprobs"}
        assert_sample_equal(read, sample, logprob_dtype)
    assert_sample_equal(cache[-1], written[-1], logprob_dtype)
    assert cache.num_tokens == sum(len(s["input_ids"]) for s in written)
    assert cache.num_teacher_tokens == sum(len(s["teacher_input_ids"]) for s in written)
    assert cache.num_label_positions == sum(len(s["label_positions"]) for s in written)
    assert not cache.has_relations
    validate_cache(cache, deep=True)


def test_meta_records_writer_fields(tmp_path):
    write_cache(tmp_path / "cache", make_parts(seed=2, part_sizes=[2, 3]))
    cache = open_cache(tmp_path / "cache")
    meta = cache.meta
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == FORMAT_VERSION
    assert meta["top_k"] == TOP_K and meta["vocab_size"] == VOCAB_SIZE
    assert meta["id_dtype"] == "uint16" and meta["logprob_dtype"] == "float16"
    assert meta["fingerprints"]["data"] == "data-a"
    assert meta["config"] == {"teacher": {"model": "tiny"}, "cache": {"top_k": TOP_K}}
    assert [p["num_samples"] for p in meta["index"]["parts"]] == [2, 3]
    assert meta["index"]["totals"]["num_samples"] == 5
    assert meta["completed_at"] >= meta["created_at"]
    assert peek_cache_state(tmp_path / "cache")[0] == "complete"


def test_large_vocab_uses_uint32_ids(tmp_path):
    parts = make_parts(seed=3, part_sizes=[3])
    parts[0][0]["input_ids"][1] = 151935  # a real Qwen-sized id on the student side
    parts[0][0]["teacher_input_ids"][-len(parts[0][0]["input_ids"]) + 1] = 151935
    write_cache(tmp_path / "cache", parts, vocab_size=151936)
    cache = open_cache(tmp_path / "cache")
    assert cache.meta["id_dtype"] == "uint32"
    assert cache[0]["input_ids"][1] == 151935
    validate_cache(cache)


def test_read_range_and_iteration_cross_parts(tmp_path):
    parts = make_parts(seed=4, part_sizes=[3, 4, 2])
    write_cache(tmp_path / "cache", parts)
    cache = open_cache(tmp_path / "cache")
    written = [sample for part in parts for sample in part]
    block = cache.read_range(2, 8)  # spans all three parts
    assert [s["sample_id"] for s in block] == [s["sample_id"] for s in written[2:8]]
    for read, sample in zip(block, written[2:8], strict=True):
        assert_sample_equal(read, sample, "float16")
    assert [s["sample_id"] for s in cache] == cache.sample_ids
    assert cache.read_range(5, 5) == []
    with pytest.raises(IndexError):
        cache[9]
    with pytest.raises(IndexError):
        cache.read_range(4, 10)


def test_relations_round_trip(tmp_path):
    parts = make_parts(seed=5, part_sizes=[3, 2], with_relations=True)
    write_cache(
        tmp_path / "cache",
        parts,
        relations={"layer": 5, "num_relation_heads": NUM_RELATION_HEADS},
        relations_dtype="float32",
    )
    cache = open_cache(tmp_path / "cache")
    assert cache.has_relations
    assert cache.meta["relations"] == {
        "layer": 5,
        "num_relation_heads": NUM_RELATION_HEADS,
        "kinds": ["qq", "kk", "vv"],
        "dtype": "float32",
    }
    for read, sample in zip(cache, [s for part in parts for s in part], strict=True):
        n = len(sample["label_positions"])
        assert read["relations"].shape == (3, NUM_RELATION_HEADS, n, n)
        np.testing.assert_array_equal(read["relations"], sample["relations"])
        assert_sample_equal(read, sample, "float16")
    validate_cache(cache)


def test_relations_float16_round_trip(tmp_path):
    parts = make_parts(seed=6, part_sizes=[2], with_relations=True)
    write_cache(tmp_path / "cache", parts, relations={"layer": 0, "num_relation_heads": NUM_RELATION_HEADS})
    cache = open_cache(tmp_path / "cache")
    expected = parts[0][1]["relations"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cache[1]["relations"], expected)
    validate_cache(cache)


def test_stats_counts_and_kept_mass(tmp_path):
    parts = make_parts(seed=7, part_sizes=[4, 3])
    write_cache(tmp_path / "cache", parts, logprob_dtype="float32")
    cache = open_cache(tmp_path / "cache")
    stats = cache_stats(cache)
    written = [s for part in parts for s in part]
    kept = np.concatenate([np.exp(s["topk_logprobs"].astype(np.float64)).sum(axis=1) for s in written])
    assert stats["samples"] == 7 and stats["top_k"] == TOP_K
    assert stats["distilled_positions"] == len(kept)
    assert stats["student_tokens"] == sum(len(s["input_ids"]) for s in written)
    assert stats["teacher_tokens"] == sum(len(s["teacher_input_ids"]) for s in written)
    files = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert stats["bytes_on_disk"] == sum(f.stat().st_size for f in files)
    assert stats["bytes_per_position"] == pytest.approx(stats["bytes_on_disk"] / len(kept))
    assert stats["kept_mass"]["min"] == pytest.approx(kept.min(), rel=1e-5)
    assert stats["kept_mass"]["max"] == pytest.approx(kept.max(), rel=1e-5)
    assert stats["kept_mass"]["median"] == pytest.approx(np.median(kept), rel=1e-5)
    assert stats["kept_mass"]["mean"] == pytest.approx(kept.mean(), rel=1e-5)
    assert 0 < stats["kept_mass"]["min"] <= stats["kept_mass"]["p10"] <= stats["kept_mass"]["max"] < 1


def test_samples_without_distilled_positions_round_trip(tmp_path):
    parts = make_parts(seed=8, part_sizes=[3], with_relations=True)
    empty = {
        "sample_id": "nothing-to-distil",
        "input_ids": [5, 6, 7],
        "teacher_input_ids": [1, 5, 6, 7],
        "label_positions": [],
        "teacher_positions": [],
        "topk_ids": [],
        "topk_logprobs": np.zeros((0, TOP_K), dtype=np.float32),
        "label_logprobs": [],
        "relations": [],
    }
    parts[0].insert(1, empty)
    write_cache(tmp_path / "cache", parts, relations={"layer": 2, "num_relation_heads": NUM_RELATION_HEADS})
    cache = open_cache(tmp_path / "cache")
    read = cache[1]
    assert read["sample_id"] == "nothing-to-distil"
    np.testing.assert_array_equal(read["input_ids"], [5, 6, 7])
    np.testing.assert_array_equal(read["teacher_input_ids"], [1, 5, 6, 7])
    assert read["label_positions"].shape == (0,) and read["label_positions"].dtype == np.int64
    assert read["topk_ids"].shape == (0, TOP_K) and read["topk_logprobs"].shape == (0, TOP_K)
    assert read["relations"].shape == (3, NUM_RELATION_HEADS, 0, 0)
    assert_sample_equal(cache[2], parts[0][2], "float16")
    validate_cache(cache, deep=True)


def test_relations_spec_may_come_from_meta(tmp_path):
    parts = make_parts(seed=9, part_sizes=[2], with_relations=True)
    meta = make_meta()
    meta["relations"] = {"layer": 4, "num_relation_heads": NUM_RELATION_HEADS, "kinds": ["qq", "kk", "vv"]}
    write_cache(tmp_path / "cache", parts, meta=meta)
    cache = open_cache(tmp_path / "cache")
    assert cache.meta["relations"] == {
        "layer": 4,
        "num_relation_heads": NUM_RELATION_HEADS,
        "kinds": ["qq", "kk", "vv"],
        "dtype": "float16",
    }
    assert cache[1]["relations"].shape[:2] == (3, NUM_RELATION_HEADS)
