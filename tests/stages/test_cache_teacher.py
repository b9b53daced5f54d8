"""Stage one end to end on the shipped tiny teacher: a complete, valid, correctly aligned cache; resumption;
parallel workers; an independent re-scoring (the off-by-one guard)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cache_schema import CacheMismatchError, open_cache, read_part_commit, validate_cache
from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import assert_caches_equal, tiny_config


def test_cache_is_complete_valid_and_described(tiny_hf_cache):
    cfg = tiny_hf_cache
    cache = open_cache(cfg.cache.path)
    validate_cache(cache, deep=True)
    assert len(cache) == 24 and cache.meta["top_k"] == 8
    assert set(cache.meta["fingerprints"]) == {"teacher", "tokenizer", "data", "prompt"}
    assert cache.meta["num_parts"] == 3
    sample = cache[0]
    assert sample["sample_id"] == "train:1"
    # 3-shot teacher context is longer than the student's; both end in the same answer ids.
    n = len(sample["label_positions"])
    assert len(sample["teacher_input_ids"]) > len(sample["input_ids"])
    np.testing.assert_array_equal(sample["input_ids"][-n:], sample["teacher_input_ids"][-n:])
    np.testing.assert_array_equal(sample["input_ids"][sample["label_positions"]],
                                  sample["teacher_input_ids"][sample["teacher_positions"]])


def test_independent_rescoring_finds_every_cached_value(tiny_hf_cache):
    """Off-by-one guard: a plain transformers forward over teacher_input_ids, log-softmax at tp-1, reproduces
    the cached top-K and label logprobs at exactly the positions the convention names."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_cache
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()
    cache = open_cache(cfg.cache.path)
    for i in range(0, len(cache), 5):
        sample = cache[i]
        ids = torch.as_tensor(sample["teacher_input_ids"])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        rows = logprobs[torch.as_tensor(sample["teacher_positions"]) - 1]          # [n, V]
        expected_top, expected_ids = rows.topk(8, dim=-1)
        # float16 storage: ~1e-3 relative; ids equal except where neighbours tie within that.
        np.testing.assert_allclose(sample["topk_logprobs"], expected_top.numpy(), atol=2e-2, rtol=2e-3)
        gaps = np.diff(expected_top.numpy(), axis=-1)
        clear = np.concatenate([np.abs(gaps) > 2e-2, np.ones((len(gaps), 1), bool)], axis=1)
        clear &= np.concatenate([np.ones((len(gaps), 1), bool), np.abs(gaps) > 2e-2], axis=1)
        np.testing.assert_array_equal(sample["topk_ids"][clear], expected_ids.numpy()[clear])
        labels = torch.as_tensor(sample["teacher_input_ids"][sample["teacher_positions"]])
        expected_label = rows.gather(1, labels[:, None])[:, 0].numpy()
        np.testing.assert_allclose(sample["label_logprobs"], expected_label, atol=1e-4)
        # Shifted by one position the values must NOT match: the test can tell an off-by-one.
        shifted = logprobs[torch.as_tensor(sample["teacher_positions"])].topk(8, dim=-1).values.numpy()
        assert np.abs(shifted - sample["topk_logprobs"]).max() > 0.1


def test_tempered_cache_stores_the_exact_log_normalizer(tmp_path):
    """train.temperature=2 on the hf backend: stage one stores log Σ_V p^(1/2) per position (cache.temperatures
    defaults to [1, 2]), equal to an independent dense re-scoring, and the cache validates deeply."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, "train.temperature=2", "data.max_samples=8")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    cache = open_cache(cfg.cache.path)
    validate_cache(cache, deep=True)
    assert cache.temperatures == (1.0, 2.0) and cache.meta["format_version"] == 4
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()
    for sample in cache:
        with torch.no_grad():
            logits = model(torch.as_tensor(sample["teacher_input_ids"])[None]).logits[0].float()
        rows = torch.log_softmax(logits, dim=-1)[torch.as_tensor(sample["teacher_positions"]) - 1]  # [n, V]
        np.testing.assert_allclose(sample["log_normalizers"][:, 0], torch.logsumexp(rows / 2, -1).numpy(),
                                   atol=1e-4, rtol=0)


def test_rerun_is_a_no_op_and_mismatch_is_refused(tiny_hf_cache):
    cfg = tiny_hf_cache
    said = []
    assert cache_teacher(cfg, workers=0, progress=False, echo=said.append)["nothing_to_do"]
    assert "nothing to do" in said[0]
    from pipeline.config_loader import load_config

    other = load_config("tiny", ["teacher.backend=hf", "data.max_samples=24", "cache.shard_size=8",
                                 "teacher.top_k=4", f"cache.path={cfg.cache.path}"])
    with pytest.raises(CacheMismatchError, match="top_k"):
        cache_teacher(other, workers=0, progress=False, echo=said.append)
    assert open_cache(cfg.cache.path).meta["top_k"] == 8   # untouched


def test_overwrite_replaces_a_mismatched_cache(tmp_path):
    cfg = tiny_config(tmp_path, "data.max_samples=8")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    other = tiny_config(tmp_path, "data.max_samples=8", "teacher.top_k=4")
    summary = cache_teacher(other, workers=0, overwrite=True, progress=False, echo=lambda *_: None)
    assert summary["samples"] == 8 and open_cache(other.cache.path).meta["top_k"] == 4


def test_zero_shot_teacher_input_equals_student_input(tmp_path):
    cfg = tiny_config(tmp_path, "data.num_fewshot=0", "data.max_samples=8")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    for sample in open_cache(cfg.cache.path):
        np.testing.assert_array_equal(sample["input_ids"], sample["teacher_input_ids"])
        np.testing.assert_array_equal(sample["label_positions"], sample["teacher_positions"])


@pytest.mark.slow
def test_two_dask_workers_write_the_same_cache_as_one(tmp_path, tiny_hf_cache):
    cfg = tiny_config(tmp_path, "cache.path=" + str(tmp_path / "two"))
    summary = cache_teacher(cfg, workers=2, progress=False, echo=lambda *_: None)
    assert summary["parts_scored"] == 3
    assert_caches_equal(tiny_hf_cache.cache.path, cfg.cache.path)


def _stage_one_command(cache_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--config", "tiny", "--no-progress",
            "teacher.backend=hf", "teacher.top_k=8", "data.max_samples=96", "cache.shard_size=4",
            f"cache.path={cache_path}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("sets", [(), ("data.fewshot_sets=8",)], ids=["own-shots", "shared-sets"])
def test_killed_run_resumes_to_an_identical_cache(tmp_path, sets):
    """SIGKILL the whole process group once some parts are committed; the rerun finishes an identical cache
    (also with shared shot sets)."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_stage_one_command(killed, *sets), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        committed = sum(read_part_commit(killed, i) is not None for i in range(24))
        if committed >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "stage one finished before it could be killed; give it more work"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = sum(read_part_commit(killed, i) is not None for i in range(24))
    assert 3 <= committed_before < 24
    with pytest.raises(ValueError):
        open_cache(killed)                                  # incomplete: refuses to open
    resumed = subprocess.run(_stage_one_command(killed, *sets), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and f"{committed_before} reused" in resumed.stdout
    subprocess.run(_stage_one_command(clean, "--workers", "0", *sets), env=env, check=True, capture_output=True)
    assert_caches_equal(killed, clean)


def test_attention_relations_are_cached_with_the_hf_backend(tmp_path):
    cfg = tiny_config(tmp_path, "data.max_samples=6", "teacher.attention.enabled=true",
                      "teacher.attention.layer=-1", "teacher.attention.num_heads=4")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    cache = open_cache(cfg.cache.path)
    validate_cache(cache, deep=True)
    assert cache.has_relations
    assert cache.meta["relations"]["layer"] == -1 and cache.meta["relations"]["num_relation_heads"] == 4
    for sample in cache:
        n = len(sample["label_positions"])
        relations = sample["relations"]
        assert relations.shape == (3, 4, n, n)
        np.testing.assert_allclose(relations.sum(-1), 1.0, atol=5e-3)   # float16 storage


def test_existing_dask_scheduler(tmp_path, tiny_hf_cache):
    """--scheduler ADDRESS runs the shards on a cluster that is already up."""
    from distributed import LocalCluster

    cfg = tiny_config(tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = cache_teacher(cfg, scheduler=cluster.scheduler_address, progress=False, echo=lambda *_: None)
    assert summary["parts_scored"] == 3
    assert_caches_equal(tiny_hf_cache.cache.path, cfg.cache.path)


def test_engine_threads_share_cores_for_hf_and_give_vllm_one():
    from stages.cache_teacher import engine_threads

    assert [engine_threads("hf", workers, cpus=8) for workers in (1, 2, 3, 16)] == [8, 4, 2, 1]
    # vLLM's CPU runner would warn of spin-wait contention with more; cores go to more workers instead
    assert [engine_threads("vllm", workers, cpus=8) for workers in (1, 4)] == [1, 1]
