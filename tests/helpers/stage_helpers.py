"""Helpers for stage tests: tiny configs pointing at the shipped assets, and cache comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from cache_schema import format as fmt
from cache_schema import open_cache
from cache_schema.integrity import DIGESTS_KEY, part_file_digests
from cache_schema.part_layout import StorageDtypes, part_checksum
from kd.teacher.agreement import AgreementTolerances, position_agreement
from pipeline.config_loader import load_config

TINY_FAST = ["teacher.backend=hf", "data.max_samples=24", "cache.shard_size=8", "teacher.top_k=8"]


def tiny_config(tmp_path, *overrides: str):
    """tiny.yaml on the hf backend, 24 samples in 3 parts, cache under tmp_path."""
    return load_config("tiny", [*TINY_FAST, f"cache.path={tmp_path}/cache",
                                f"train.output_dir={tmp_path}/run", *overrides])


def assert_caches_equal(path_a, path_b) -> None:
    """Two caches hold the same samples in the same order with identical arrays."""
    a, b = open_cache(path_a), open_cache(path_b)
    assert len(a) == len(b)
    assert a.meta["fingerprints"] == b.meta["fingerprints"]
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "sample_id":
                assert sa[key] == sb[key]
            else:
                np.testing.assert_array_equal(sa[key], sb[key], err_msg=f"sample {i} {key}")


def reseal_cache(path) -> None:
    """Re-record every part's digests and checksum after a test rewrote its arrays in place (what a forger
    of a cache would do), so the forged cache opens and only its values are wrong."""
    root = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    meta = dict(root.attrs)
    names = StorageDtypes.from_meta(meta).array_names()
    index = meta["index"]
    for part_id in range(int(meta["num_parts"])):
        part_dir = Path(path) / fmt.part_path(part_id)
        group = zarr.open_group(store=str(part_dir), mode="r+", zarr_format=3)
        commit = dict(group.attrs[fmt.PART_COMMIT_ATTR])
        commit["checksum"] = part_checksum({name: group[name] for name in names}, names)
        commit[DIGESTS_KEY] = part_file_digests(part_dir)
        group.attrs[fmt.PART_COMMIT_ATTR] = commit
        index["parts"][part_id] = commit
    root.attrs["index"] = index


def assert_caches_agree(cache_a, cache_b, shift: int = 0) -> None:
    """Every scored position agrees within the bf16 bounds (positions of b taken ``shift`` later)."""
    tolerances, top1 = AgreementTolerances(), []
    for a, b in zip(cache_a, cache_b):
        np.testing.assert_array_equal(a["teacher_input_ids"], b["teacher_input_ids"])
        n = len(a["label_logprobs"]) - shift
        agreement = position_agreement(a["topk_ids"][:n], a["topk_logprobs"][:n], a["label_logprobs"][:n],
                                       b["topk_ids"][shift:], b["topk_logprobs"][shift:], b["label_logprobs"][shift:])
        assert agreement.within(tolerances).all(), f"sample {a['sample_id']}"
        top1.append(agreement.top1_same)
    assert np.concatenate(top1).mean() >= tolerances.min_top1_agreement
