"""Stage one with shared shot sets (``data.fewshot_sets``) on the tiny teacher (hf backend): samples of a set
share the teacher prefix, the stored sequences are what the teacher scored (an independent dense re-scoring),
and a cache built with sets is refused by a run without them, naming the setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_schema import CacheMismatchError, open_cache, validate_cache
from kd.errors import DataError
from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import tiny_config

QUIET = {"workers": 0, "progress": False, "echo": lambda *_: None}


@pytest.fixture(scope="module")
def shared_set_cache(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("sets"), "data.max_samples=16", "data.fewshot_sets=4")
    cache_teacher(cfg, **QUIET)
    return cfg


def _shot_prefix(sample) -> tuple[int, ...]:
    """Teacher tokens before the student's prompt (the shots): the teacher sequence ends in the student's."""
    extra = len(sample["teacher_input_ids"]) - len(sample["input_ids"])
    return tuple(sample["teacher_input_ids"][:extra].tolist())


def test_samples_share_one_of_the_sets_as_their_prefix(shared_set_cache):
    cache = open_cache(shared_set_cache.cache.path)
    validate_cache(cache, deep=True)
    assert cache.meta["fewshot_sets"] == 4
    prefixes = [_shot_prefix(sample) for sample in cache]
    assert all(prefixes) and 2 <= len(set(prefixes)) <= 4
    for sample in cache:  # the student sequence is the teacher's tail: the prompt is shots + the question
        np.testing.assert_array_equal(sample["teacher_input_ids"][-len(sample["input_ids"]):], sample["input_ids"])


def test_stored_sequences_are_what_the_teacher_scored(shared_set_cache):
    """An independent dense forward over the stored teacher_input_ids reproduces the cached targets at tp - 1."""
    from transformers import AutoModelForCausalLM

    cfg = shared_set_cache
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()
    for sample in open_cache(cfg.cache.path):
        with torch.no_grad():
            logits = model(torch.as_tensor(sample["teacher_input_ids"])[None]).logits[0]
        rows = torch.log_softmax(logits.float(), -1)[torch.as_tensor(sample["teacher_positions"]) - 1]  # [n, V]
        np.testing.assert_allclose(sample["topk_logprobs"], rows.topk(8, -1).values.numpy(), atol=2e-2, rtol=2e-3)
        labels = torch.as_tensor(sample["teacher_input_ids"][sample["teacher_positions"]])
        np.testing.assert_allclose(sample["label_logprobs"], rows.gather(1, labels[:, None])[:, 0].numpy(),
                                   atol=1e-4)


def test_cache_with_sets_is_refused_without_them(shared_set_cache):
    cfg = shared_set_cache
    without = tiny_config(cfg.cache.path.rsplit("/cache", 1)[0], "data.max_samples=16")
    with pytest.raises(CacheMismatchError, match=r"data.fewshot_sets: 4 in the cache, 0 now") as info:
        cache_teacher(without, **QUIET)
    assert "\n" not in str(info.value)
    assert open_cache(cfg.cache.path).meta["fewshot_sets"] == 4  # untouched


def test_more_sets_than_the_pool_allows_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, "data.max_samples=4", "data.fewshot_sets=100000")
    with pytest.raises(DataError, match=r"data.fewshot_sets=100000 disjoint sets .* lower data.fewshot_sets"):
        cache_teacher(cfg, **QUIET)
    assert not (tmp_path / "cache").exists()
