"""The writer refuses bad samples before writing, foreign caches, and never deletes non-cache directories."""

from __future__ import annotations

import numpy as np
import pytest

from cache_schema import (
    CacheError,
    CacheMismatchError,
    CacheValidationError,
    CacheWriter,
    open_cache,
    peek_cache_state,
    write_part,
)
from cache_schema.format import part_path
from tests.cache_schema.sample_factory import TOP_K, VOCAB_SIZE, make_meta, make_parts, write_cache


def _writer(path, meta=None, num_parts=1, **kwargs):
    kwargs.setdefault("top_k", TOP_K)
    return CacheWriter(path, meta or make_meta(top_k=kwargs["top_k"]), num_parts, vocab_size=VOCAB_SIZE, **kwargs)


def _break_token_equality(sample):
    sample["teacher_input_ids"][sample["teacher_positions"][0]] += 1


def _unsorted(sample):
    sample["topk_logprobs"][0] = sample["topk_logprobs"][0][::-1].copy()


def _id_too_large(sample):
    sample["topk_ids"][0, 0] = VOCAB_SIZE


def _position_zero(sample):
    sample["label_positions"][0] = 0


def _wrong_k(sample):
    sample["topk_ids"] = sample["topk_ids"][:, :4]


def _length_mismatch(sample):
    sample["label_logprobs"] = sample["label_logprobs"][:-1]


def _nan_logprob(sample):
    sample["topk_logprobs"][0, 3] = np.nan


def _extra_key(sample):
    sample["text"] = "hello"


BAD_SAMPLES = [
    (_break_token_equality, "token mismatch"),
    (_unsorted, "not sorted"),
    (_id_too_large, "outside \\[0, 1000\\)"),
    (_position_zero, "label_positions out of range"),
    (_wrong_k, "topk_ids has shape \\(\\d+, 4\\), expected \\[n, K\\]"),
    (_length_mismatch, "label_logprobs has shape"),
    (_nan_logprob, "non-finite"),
    (_extra_key, "unexpected keys \\['text'\\]"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD_SAMPLES, ids=[b[0].__name__.strip("_") for b in BAD_SAMPLES])
def test_bad_sample_refused_before_anything_is_written(tmp_path, corrupt, message):
    path = tmp_path / "cache"
    samples = make_parts(seed=50, part_sizes=[3], min_pairs=2)[0]
    corrupt(samples[2])
    with _writer(path) as writer:
        with pytest.raises(CacheValidationError, match=message) as caught:
            write_part(path, 0, samples)
        assert "p0-s2" in str(caught.value)
        assert not (path / part_path(0)).exists()
        assert writer.pending_parts() == [0]


def test_duplicate_sample_ids_refused(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=51, part_sizes=[2, 1])
    parts[1][0]["sample_id"] = "p0-s1"
    with _writer(path, num_parts=2) as writer:
        write_part(path, 0, parts[0])
        write_part(path, 1, parts[1])
        with pytest.raises(CacheValidationError, match="'p0-s1' appears in part 0 and part 1"):
            writer.finalize()
    parts[0][1]["sample_id"] = "p0-s0"
    with _writer(tmp_path / "other") as writer:
        with pytest.raises(CacheValidationError, match="'p0-s0' appears twice"):
            write_part(tmp_path / "other", 0, parts[0])


def test_relations_required_when_configured_and_refused_otherwise(tmp_path):
    plain = make_parts(seed=52, part_sizes=[1])[0]
    with _writer(tmp_path / "rel", relations={"layer": 3, "num_relation_heads": 2}):
        with pytest.raises(CacheValidationError, match="missing keys \\['relations'\\]"):
            write_part(tmp_path / "rel", 0, plain)
    with_relations = make_parts(seed=52, part_sizes=[1], with_relations=True)[0]
    with _writer(tmp_path / "norel"):
        with pytest.raises(CacheValidationError, match="no relations group"):
            write_part(tmp_path / "norel", 0, with_relations)


@pytest.mark.parametrize("changed", ["fingerprints", "top_k"])
def test_fingerprint_mismatch_raises(tmp_path, changed):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=53, part_sizes=[1]))
    if changed == "fingerprints":
        writer, detail = _writer(path, meta=make_meta(data_fingerprint="data-b")), "data-b"
    else:
        writer, detail = _writer(path, top_k=4), "top_k"
    with pytest.raises(CacheMismatchError, match=f"complete cache at .* was made from other inputs .*{detail}"):
        with writer:
            pass


def test_incomplete_cache_with_other_num_parts_raises(tmp_path):
    path = tmp_path / "cache"
    with _writer(path, num_parts=2):
        pass
    with pytest.raises(CacheMismatchError, match="num_parts: existing 2 vs requested 3"):
        with _writer(path, num_parts=3):
            pass


def test_overwrite_replaces_an_existing_cache(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=54, part_sizes=[2]))
    new_parts = make_parts(seed=55, part_sizes=[1, 1])
    new_parts[1][0]["sample_id"] = "fresh"
    write_cache(path, new_parts, meta=make_meta(data_fingerprint="data-b"), overwrite=True)
    cache = open_cache(path)
    assert cache.sample_ids == ["p0-s0", "fresh"]
    assert cache.meta["fingerprints"]["data"] == "data-b"


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_cache_directory_is_never_deleted(tmp_path, overwrite):
    path = tmp_path / "precious"
    path.mkdir()
    (path / "thesis.tex").write_text("do not delete")
    with pytest.raises(CacheError, match="is not a kd-topk-cache cache; refusing"):
        with _writer(path, overwrite=overwrite):
            pass
    assert (path / "thesis.tex").read_text() == "do not delete"
    assert peek_cache_state(path) == ("not_a_cache", None)


def test_empty_existing_directory_is_used(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    write_cache(path, make_parts(seed=56, part_sizes=[1]))
    assert len(open_cache(path)) == 1


def test_meta_problems_are_reported(tmp_path):
    meta = make_meta()
    del meta["fingerprints"]["prompt"]
    with pytest.raises(CacheError, match="fingerprints'\\] must be a dict with keys"):
        _writer(tmp_path / "a", meta=meta)
    with pytest.raises(CacheError, match="'top_k'=8 conflicts with the writer's value 4"):
        CacheWriter(tmp_path / "a", make_meta(), 1, top_k=4, vocab_size=VOCAB_SIZE)
    with pytest.raises(CacheError, match="JSON-serializable"):
        _writer(tmp_path / "a", meta={**make_meta(), "config": {"path": object()}})
    with pytest.raises(CacheError, match="logprob_dtype must be one of"):
        _writer(tmp_path / "a", logprob_dtype="bfloat16")


def test_part_id_out_of_range(tmp_path):
    with _writer(tmp_path / "cache", num_parts=2):
        with pytest.raises(CacheError, match="part_id 2 out of range"):
            write_part(tmp_path / "cache", 2, [])


def test_logprob_below_float16_range_refused_not_stored_as_inf(tmp_path):
    samples = make_parts(seed=57, part_sizes=[2])[0]
    samples[1]["topk_logprobs"][0, -1] = -70000.0  # finite in float32, -inf in float16
    with _writer(tmp_path / "cache") as writer:
        with pytest.raises(CacheValidationError, match="'p0-s1' has topk_logprobs below the float16 range"):
            write_part(tmp_path / "cache", 0, samples)
        assert writer.pending_parts() == [0]
    write_cache(tmp_path / "wide", [samples], logprob_dtype="float32")
    assert open_cache(tmp_path / "wide")[1]["topk_logprobs"][0, -1] == -70000.0


def test_non_dict_sample_refused(tmp_path):
    with _writer(tmp_path / "cache"):
        with pytest.raises(CacheValidationError, match="a sample must be a dict"):
            write_part(tmp_path / "cache", 0, [("not", "a", "dict")])
