"""Shared fixtures: a tiny stage-one cache made once per session."""

from __future__ import annotations

import pytest

from tests.helpers.stage_helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_hf_cache(tmp_path_factory):
    """A complete stage-one cache of 24 tiny samples (hf backend, in process) shared by read-only tests."""
    from stages.cache_teacher import cache_teacher

    root = tmp_path_factory.mktemp("tiny_hf")
    cfg = tiny_config(root)
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    return cfg
