"""Helpers for stage tests: tiny configs pointing at the shipped assets, and cache comparison."""

from __future__ import annotations

import numpy as np

from cache_schema import open_cache
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
