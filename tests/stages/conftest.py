"""Fixtures shared by stage tests."""

from __future__ import annotations

import pytest

from tests.helpers.train_helpers import DISTILL_STAGE_ONE, quiet


@pytest.fixture(scope="session")
def distill_cache(tmp_path_factory):
    """Root holding ``cache/``: stage one (hf backend) on 400 tiny training samples, K=16, made once per session."""
    from pipeline.config_loader import load_config
    from stages.cache_teacher import cache_teacher

    root = tmp_path_factory.mktemp("distill")
    cfg = load_config("tiny", [*DISTILL_STAGE_ONE, f"cache.path={root}/cache", f"train.output_dir={root}/unused"])
    cache_teacher(cfg, workers=0, progress=False, echo=quiet)
    return root
