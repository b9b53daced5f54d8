"""At the real 151,936-row vocabulary (scale assets, Qwen3-shaped teacher, tied embeddings): stage one's vLLM
span path = its hf backend = vLLM prompt_logprobs within the bf16 agreement bounds, and not one position off.
Skipped where `make assets-scale` has not been run; slow (two engine starts)."""

from __future__ import annotations

import pytest

from cache_schema import open_cache
from pipeline.assets.scale import SCALE_BUILD_DIR
from pipeline.config_loader import load_config
from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import assert_caches_agree

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SCALE_BUILD_DIR / "build_info.json").is_file(),
                                                   reason="scale assets not built: run `make assets-scale`")]
COMMON = ["data.max_samples=8", "cache.shard_size=8", "teacher.dtype=bfloat16", "data.num_fewshot=2"]


@pytest.fixture(scope="module")
def scale_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_agreement")
    caches = {}
    for name, overrides in {"span": ["teacher.backend=vllm", "teacher.scoring=span"],
                            "prompt_logprobs": ["teacher.backend=vllm", "teacher.scoring=prompt_logprobs"],
                            "hf": ["teacher.backend=hf"]}.items():
        cfg = load_config("scale", [*COMMON, *overrides, f"cache.path={root}/{name}",
                                    f"train.output_dir={root}/run"])
        cache_teacher(cfg, workers=1 if name != "hf" else 0, progress=False, echo=lambda *_: None)
        caches[name] = open_cache(cfg.cache.path)
    return caches


def test_span_equals_hf_and_prompt_logprobs_at_real_vocabulary(scale_caches):
    assert_caches_agree(scale_caches["span"], scale_caches["hf"])
    assert_caches_agree(scale_caches["span"], scale_caches["prompt_logprobs"])


def test_span_shifted_by_one_fails_at_real_vocabulary(scale_caches):
    with pytest.raises(AssertionError):
        assert_caches_agree(scale_caches["span"], scale_caches["hf"], shift=1)
