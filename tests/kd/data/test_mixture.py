"""Mixtures: proportions met (within rounding, i.e. inside any sampling error), deterministic draws, repeated
small sources, sources recorded in a real stage-one cache, and train-time source reweighting."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cache_schema import open_cache
from kd.data.mixture import allocate
from kd.training.loader import BatchSchedule, CacheStream
from kd.training.training_data import source_sample_weights
from pipeline.inspect import cache_summary
from stages.cache_teacher import cache_teacher, setup
from tests.helpers.stage_helpers import tiny_config

FORMATS_DIR = Path(__file__).resolve().parents[3] / "tests" / "data" / "formats"
MIXTURE_FILE = FORMATS_DIR / "mixture.txt"
PROPORTIONS = {"chat": 0.5, "gpt": 0.3, "alpaca": 0.2}


def _mixture_config(tmp_path, *overrides: str):
    return tiny_config(tmp_path, "data.train=null", f"data.mixture_file={MIXTURE_FILE}", "data.format=openai",
                       "data.max_samples=null", "data.num_fewshot=0", "data.mixture_budget=40", *overrides)


def _drawn(cfg) -> list:
    return [sample for shard in setup(cfg).shards for sample in shard]


def test_allocate_meets_proportions_exactly_up_to_rounding():
    assert allocate(40, [0.5, 0.3, 0.2]) == [20, 12, 8]
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [0, 2, 5]) == [0, 2, 5]
    for budget in (1, 13, 997):
        quotas = allocate(budget, [0.55, 0.3, 0.15])
        assert sum(quotas) == budget
        assert all(abs(q - budget * p) < 1 for q, p in zip(quotas, [0.55, 0.3, 0.15]))


def test_sample_budget_proportions_and_determinism(tmp_path):
    first = _drawn(_mixture_config(tmp_path))
    counts = Counter(s.source for s in first)
    assert counts == {"chat": 20, "gpt": 12, "alpaca": 8}
    for name, p in PROPORTIONS.items():
        # a multinomial draw would have sd sqrt(p(1-p)/n) (~7 points here); quotas are within 1/budget
        assert abs(counts[name] / 40 - p) <= 1 / 40
    assert len({s.sample_id for s in first}) == 40  # small sources repeat with ~2, ~3 ... suffixes
    assert any(s.sample_id.endswith("~2") for s in first)
    assert all(s.sample_id.startswith(f"{s.source}/") for s in first)
    again = _drawn(_mixture_config(tmp_path))
    assert [(s.sample_id, s.pair) for s in again] == [(s.sample_id, s.pair) for s in first]
    other_seed = _drawn(_mixture_config(tmp_path, "seed=1"))
    assert [s.sample_id for s in other_seed] != [s.sample_id for s in first]
    assert Counter(s.source for s in other_seed) == counts


def test_token_budget_proportions(tmp_path):
    drawn = _drawn(_mixture_config(tmp_path, "data.mixture_unit=tokens", "data.mixture_budget=3000"))
    tokens = Counter()
    longest = Counter()
    for s in drawn:
        tokens[s.source] += len(s.pair.input_ids)
        longest[s.source] = max(longest[s.source], len(s.pair.input_ids))
    for name, quota in zip(PROPORTIONS, allocate(3000, list(PROPORTIONS.values()))):
        assert quota <= tokens[name] < quota + longest[name]


@pytest.fixture(scope="module")
def mixture_cache(tmp_path_factory):
    cfg = _mixture_config(tmp_path_factory.mktemp("mixture"), "data.mixture_budget=20", "cache.shard_size=20")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    return open_cache(cfg.cache.path)


def test_stage_one_records_each_samples_source(mixture_cache):
    assert mixture_cache.source_names == ["chat", "gpt", "alpaca"]
    assert Counter(mixture_cache.sample_sources) == {"chat": 10, "gpt": 6, "alpaca": 4}
    assert all(s["sample_id"].startswith(s["source"] + "/") for s in mixture_cache)
    per_source = cache_summary(str(mixture_cache.path))["sources"]
    assert {name: row["samples"] for name, row in per_source.items()} == {"chat": 10, "gpt": 6, "alpaca": 4}
    assert sum(row["student_tokens"] for row in per_source.values()) == mixture_cache.num_tokens


def test_source_weights_reweight_the_training_stream(mixture_cache):
    indices = np.arange(len(mixture_cache))
    sources = np.array(mixture_cache.sample_sources)
    weights = source_sample_weights(mixture_cache, indices, {"alpaca": 0.0, "gpt": 3.0})
    schedule = BatchSchedule(indices, batch_size=4, seed=0, shuffle=True, rank=0, world_size=1, drop_last=True,
                             max_tokens_per_batch=None, lengths=None, sample_weights=weights)
    drawn = np.concatenate([schedule.order(epoch) for epoch in range(200)])  # 4000 draws
    share = Counter(sources[drawn])
    assert share["alpaca"] == 0
    # expected share of gpt: 6*3 / (6*3 + 10*1) = 0.643; binomial sd over 4000 draws ~0.008
    assert abs(share["gpt"] / drawn.size - 18 / 28) < 0.03
    assert np.array_equal(schedule.order(3), BatchSchedule(
        indices, batch_size=4, seed=0, shuffle=True, rank=0, world_size=1, drop_last=True,
        max_tokens_per_batch=None, lengths=None, sample_weights=weights).order(3))  # deterministic


def test_resuming_with_other_source_weights_is_refused(mixture_cache):
    indices = np.arange(len(mixture_cache))
    make = lambda w: CacheStream(mixture_cache, indices, batch_size=4, seed=0, pad_id=0, prefetch=0,
                                 sample_weights=source_sample_weights(mixture_cache, indices, w))
    state = make({"gpt": 2.0}).state_dict()
    make({"gpt": 2.0}).load_state_dict(state)
    with pytest.raises(ValueError, match="sample_weights_crc32"):
        make({"gpt": 3.0}).load_state_dict(state)


@pytest.mark.parametrize("weights, problem", [({"web": 1.0}, "unknown source"),
                                              ({"chat": 0, "gpt": 0, "alpaca": 0}, "weight 0")])
def test_bad_source_weights(mixture_cache, weights, problem):
    with pytest.raises(ValueError, match=problem):
        source_sample_weights(mixture_cache, np.arange(len(mixture_cache)), weights)
