"""Sampled targets through both stages on the tiny assets: stage one (hf) draws S tokens per position from the
teacher at train.temperature, reproducibly; stage two trains from them (forward KL) and refuses what they
cannot serve with one line, nothing overwritten."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_schema import open_cache, validate_cache
from kd.errors import UserError
from pipeline.inspect import cache_summary, format_summary
from stages.cache_teacher import cache_teacher
from stages.train_student import train_student
from tests.helpers.stage_helpers import tiny_config

SAMPLED = ["cache.targets=sampled", "cache.samples_per_position=16", "train.kd_targets=sampled",
           "train.temperature=2", "train.topk_handling=renormalize", "train.max_steps=3", "train.batch_size=4",
           "train.eval_every=3", "train.save_every=0", "train.num_validation_samples=4"]


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampled")
    cfg = tiny_config(tmp, *SAMPLED)
    cache_teacher(cfg, workers=0, progress=False, echo=_quiet)
    return cfg


def test_stage_one_stores_reproducible_unbiased_draws(sampled_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = open_cache(sampled_cache.cache.path)
    validate_cache(cache, deep=True)
    assert cache.top_k == 0 and cache.sampled_draws == 16 and cache.targets["temperature"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(sampled_cache.teacher.model, dtype=torch.float32).eval()
    sample = cache[0]
    with torch.no_grad():
        logits = model(torch.as_tensor(sample["teacher_input_ids"])[None]).logits[0]
    probs = torch.softmax(logits[torch.as_tensor(sample["teacher_positions"]) - 1] / 2, dim=-1)  # [n, V] at τ=2
    drawn = np.take_along_axis(probs.numpy(), sample["sampled_ids"], axis=1)
    assert np.all(drawn[sample["sampled_counts"] > 0] > 0)  # only tokens the teacher gives mass
    assert np.all(sample["sampled_counts"].sum(1) == 16) and sample["topk_ids"].shape[1] == 0
    summary = cache_summary(sampled_cache.cache.path)
    unique = summary["sampled"]["unique_mean"]
    assert summary["targets"] == "sampled" and 1 <= unique < 16 and summary["bytes_per_kept_entry"] is None
    text = format_summary(summary)
    assert "sampled targets  S=16 draws at τ=2" in text and f"mean {unique:.1f}" in text
    again = tiny_config(tmp_path, *SAMPLED, "data.max_samples=8")  # same seed, ids and positions: same draws
    cache_teacher(again, workers=0, progress=False, echo=_quiet)
    np.testing.assert_array_equal(open_cache(again.cache.path)[0]["sampled_ids"], sample["sampled_ids"])


def test_stage_two_trains_from_sampled_targets(sampled_cache):
    summary = train_student(sampled_cache, progress=False, echo=_quiet)
    assert summary["steps"] == 3 and np.isfinite(summary["final_train_loss"])
    assert np.isfinite(summary["validations"][-1]["kd"]) and summary["validations"][-1]["kd"] > 0


def test_stage_two_refuses_what_sampled_targets_cannot_serve(sampled_cache, tmp_path):
    cfg = tiny_config(tmp_path, f"cache.path={sampled_cache.cache.path}", "train.max_steps=1")
    with pytest.raises(UserError, match="stores sampled targets only"):  # kd_targets=topk on a K=0 cache
        train_student(cfg, progress=False, echo=_quiet)
    at_other_tau = tiny_config(tmp_path, *SAMPLED, f"cache.path={sampled_cache.cache.path}", "train.temperature=1")
    with pytest.raises(UserError, match="drew its sampled targets at τ=2"):
        train_student(at_other_tau, progress=False, echo=_quiet)
    assert not (tmp_path / "run").exists()
