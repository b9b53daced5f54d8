"""validate(deep=True) catches faults planted directly in the stored arrays, naming fault and sample."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import CacheValidationError, open_cache, validate_cache
from cache_schema.format import part_path
from tests.cache_schema.sample_factory import (
    NUM_RELATION_HEADS,
    VOCAB_SIZE,
    make_parts,
    reseal_digests,
    write_cache,
)


@pytest.fixture()
def cache_path(tmp_path):
    path = tmp_path / "cache"
    write_cache(path, make_parts(seed=40, part_sizes=[3, 2], min_pairs=2))
    validate_cache(open_cache(path), deep=True)  # the unmodified cache is valid
    return path


def _part0(path):
    return zarr.open_group(store=str(path / part_path(0)), mode="r+", zarr_format=3)


def _sample_of_row(group, row: int) -> str:
    sample = int(np.searchsorted(group["label_offsets"][:], row, side="right") - 1)
    return f"p0-s{sample}"


def _unsorted_row(group):
    group["topk_logprobs"][0] = group["topk_logprobs"][0][::-1]
    return 0


def _positive_logprob(group):
    group["topk_logprobs"][1, 0] = 0.5
    return 1


def _nan_label_logprob(group):
    group["label_logprobs"][2] = np.nan
    return 2


def _id_out_of_vocab(group):
    group["topk_ids"][3, 2] = VOCAB_SIZE
    return 3


def _kept_mass_above_one(group):
    group["topk_logprobs"][4] = np.full(group["topk_logprobs"].shape[1], np.log(0.3))
    return 4


def _broken_token_equality(group):
    position = int(group["label_positions"][0])  # sample 0's first pair; token offset of sample 0 is 0
    group["input_ids"][position] = (int(group["input_ids"][position]) + 1) % VOCAB_SIZE
    return 0


def _label_position_zero(group):
    group["label_positions"][0] = 0
    return 0


FAULTS = [
    (_unsorted_row, "not sorted by descending logprob"),
    (_positive_logprob, "positive logprob"),
    (_nan_label_logprob, "label_logprobs: 1 non-finite"),
    (_id_out_of_vocab, f"topk_ids: 1 id\\(s\\) outside \\[0, {VOCAB_SIZE}\\)"),
    (_kept_mass_above_one, "kept mass Σexp\\(top-K\\) > 1: 2\\.39"),
    (_broken_token_equality, "token mismatch at 1 pair"),
    (_label_position_zero, "label_positions out of range"),
]


@pytest.mark.parametrize(("plant", "message"), FAULTS, ids=[f[0].__name__.strip("_") for f in FAULTS])
def test_planted_fault_is_caught(cache_path, plant, message):
    group = _part0(cache_path)
    row = plant(group)
    sample_id = _sample_of_row(group, row)
    reseal_digests(cache_path)
    cache = open_cache(cache_path)
    validate_cache(cache, deep=False)  # shallow checks read no sample values
    with pytest.raises(CacheValidationError, match=message) as caught:
        validate_cache(cache, deep=True)
    assert f"sample {sample_id!r}" in str(caught.value)
    assert "part 0: checksum mismatch" in str(caught.value)


def test_non_monotone_offsets_caught_by_shallow_validation(cache_path):
    group = _part0(cache_path)
    offsets = group["token_offsets"][:]
    group["token_offsets"][1] = offsets[2] + 1  # last offset untouched, so opening still succeeds
    reseal_digests(cache_path)
    cache = open_cache(cache_path)
    for deep in (False, True):
        with pytest.raises(CacheValidationError, match="part 0: token_offsets not monotone at sample 1 \\('p0-s1'\\)"):
            validate_cache(cache, deep=deep)


def test_offsets_not_starting_at_zero(cache_path):
    group = _part0(cache_path)
    group["label_offsets"][0] = 1
    reseal_digests(cache_path)
    with pytest.raises(CacheValidationError, match="label_offsets starts at 1, not 0"):
        validate_cache(open_cache(cache_path), deep=False)


def test_bad_relation_rows_caught(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=41, part_sizes=[2], with_relations=True, min_pairs=2)
    write_cache(path, parts, relations={"layer": 1, "num_relation_heads": NUM_RELATION_HEADS})
    validate_cache(open_cache(path))
    group = _part0(path)
    group["relations"][0:4] = group["relations"][0:4] * 2  # first row of sample 0 no longer sums to 1
    reseal_digests(path)
    with pytest.raises(CacheValidationError, match="sample 'p0-s0': relations rows do not sum to 1"):
        validate_cache(open_cache(path))


def test_fp16_rounding_near_zero_is_tolerated(tmp_path):
    path = tmp_path / "cache"
    parts = make_parts(seed=42, part_sizes=[1])
    sample = parts[0][0]
    sample["topk_logprobs"][0] = np.log(np.r_[0.9999, np.full(7, 1e-5)]).astype(np.float32)  # Σ ≈ 1.00007
    write_cache(path, parts)
    stored_max = open_cache(path)[0]["topk_logprobs"].max()
    assert stored_max == np.float32(np.float16(np.log(0.9999)))
    validate_cache(open_cache(path), deep=True)
