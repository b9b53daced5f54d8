"""hf backend vs a dense reference forward (fp32), batching / chunking invariance, and input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.errors import TeacherConfigError
from kd.teacher.hf_backend import length_sorted_batches
from kd.teacher.types import ScoreRequest, ScoreRequestError
from tests.helpers.tiny_teacher import MODEL_VOCAB_SIZE, load_teacher, random_requests

TOP_K = 16
# The backend and the dense reference are two fp32 paths (hidden rows gathered, then the lm_head, vs the full
# [B, T, V] forward) whose matmuls round differently: up to 1.05e-5 apart on this machine's CPU kernels.
DENSE_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def hf_backend(tiny_teacher_dir):
    backend = load_teacher(model=str(tiny_teacher_dir), backend="hf", top_k=TOP_K, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def dense_model(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def dense_reference(model, request: ScoreRequest, top_k: int):
    """Plain model(input_ids).logits over the whole sequence; the row at tp - 1 predicts token tp."""
    ids = torch.tensor(request.teacher_input_ids)[None]  # [1, Tt]
    logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)  # [Tt, V]
    positions = torch.as_tensor(request.teacher_positions)
    rows = logprobs[positions - 1]  # [n, V]
    values, indices = rows.topk(top_k, dim=-1)
    labels = rows.gather(1, ids[0, positions][:, None])[:, 0]
    return indices.numpy(), values.numpy(), labels.numpy(), rows.numpy()


def assert_same_top_k(ids, logprobs, ref_ids, ref_logprobs, full_rows, tolerance):
    """Logprobs within tolerance; ids equal except where the reference itself ties within tolerance."""
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=tolerance, rtol=0)
    mismatched = ids != ref_ids
    for row, col in zip(*np.nonzero(mismatched)):
        # a swapped id is only acceptable if the reference gives it (almost) the same logprob
        assert abs(full_rows[row, ids[row, col]] - ref_logprobs[row, col]) <= tolerance, (row, col)


def test_hf_log_normalizers_match_the_dense_tempered_distribution(hf_backend, dense_model):
    """log Σ_V p^(1/τ) per position: with it the top-K tempered exactly equals the dense softmax(logits / τ)."""
    requests = random_requests(3, seed=4)
    temperatures = (0.5, 2.0, 5.0)
    results = hf_backend.score(requests, temperatures=temperatures)
    plain = hf_backend.score(requests)
    for request, result, untempered in zip(requests, results, plain):
        assert untempered.log_normalizers is None
        np.testing.assert_array_equal(result.topk_logprobs, untempered.topk_logprobs)
        _, _, _, full_rows = dense_reference(dense_model, request, TOP_K)  # [n, V] τ=1 logprobs
        assert result.log_normalizers.shape == (len(request.teacher_positions), 3)
        for column, tau in enumerate(temperatures):
            want = torch.logsumexp(torch.from_numpy(full_rows).double() / tau, dim=-1).numpy()
            np.testing.assert_allclose(result.log_normalizers[:, column], want, atol=DENSE_TOLERANCE / tau, rtol=0)
            tempered = torch.from_numpy(full_rows).double().div(tau).log_softmax(-1).numpy()  # dense at τ
            got = result.topk_logprobs / tau - result.log_normalizers[:, column:column + 1]
            np.testing.assert_allclose(got, np.take_along_axis(tempered, result.topk_ids, 1),
                                       atol=2 * DENSE_TOLERANCE / min(tau, 1.0), rtol=0)
    empty = hf_backend.score([ScoreRequest([5, 6, 7], np.array([], dtype=np.int64))], temperatures=(2.0,))[0]
    assert empty.log_normalizers.shape == (0, 1)


def test_hf_matches_dense_reference(hf_backend, dense_model):
    requests = random_requests(6, seed=1)
    results = hf_backend.score(requests)
    assert hf_backend.vocab_size == MODEL_VOCAB_SIZE and hf_backend.top_k == TOP_K
    for request, result in zip(requests, results):
        ref_ids, ref_logprobs, ref_labels, full_rows = dense_reference(dense_model, request, TOP_K)
        n = len(request.teacher_positions)
        assert result.topk_ids.shape == (n, TOP_K) and result.topk_ids.dtype == np.int64
        assert result.topk_logprobs.dtype == np.float32 and result.label_logprobs.dtype == np.float32
        assert result.relations is None
        assert np.all(np.diff(result.topk_logprobs, axis=1) <= 0), "top-K must be sorted descending"
        assert_same_top_k(result.topk_ids, result.topk_logprobs, ref_ids, ref_logprobs, full_rows, DENSE_TOLERANCE)
        np.testing.assert_allclose(result.label_logprobs, ref_labels, atol=DENSE_TOLERANCE, rtol=0)


def test_label_logprob_is_the_actual_token(hf_backend):
    """Where the actual next token is the teacher's argmax, the label logprob equals top-1 exactly."""
    request = random_requests(1, seed=2, min_len=40, max_len=40)[0]
    first = hf_backend.score([request])[0]
    ids = np.asarray(request.teacher_input_ids).copy()
    positions = np.asarray(request.teacher_positions)
    # Rewrite the sequence so each scored token is the teacher's top-1 given the (unchanged) prefix: only
    # valid for the last position, whose prefix does not contain other rewritten tokens.
    last = int(positions.max())
    row = int(np.argmax(positions))
    ids[last] = first.topk_ids[row, 0]
    rescored = hf_backend.score([ScoreRequest(ids.tolist(), np.array([last]))])[0]
    assert rescored.label_logprobs[0] == rescored.topk_logprobs[0, 0]
    assert rescored.topk_logprobs[0, 0] == pytest.approx(first.topk_logprobs[row, 0], abs=1e-5)


def test_batching_and_chunking_do_not_change_results(tiny_teacher_dir, hf_backend):
    requests = random_requests(9, seed=3)
    batched = hf_backend.score(requests)
    one_at_a_time = [hf_backend.score([request])[0] for request in requests]
    small = load_teacher(
            model=str(tiny_teacher_dir), backend="hf", top_k=TOP_K, device="cpu", max_batch_tokens=70, logprob_chunk=3
        )
    small_chunks = small.score(requests)
    small.close()
    for reference, other_a, other_b in zip(one_at_a_time, batched, small_chunks):
        for other in (other_a, other_b):
            np.testing.assert_allclose(other.topk_logprobs, reference.topk_logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(other.label_logprobs, reference.label_logprobs, atol=1e-5, rtol=0)
            agree = (other.topk_ids == reference.topk_ids).mean()
            assert agree > 0.99


def test_length_sorted_batches_respects_budget():
    lengths = [5, 50, 20, 20, 3, 120]
    batches = length_sorted_batches(lengths, max_batch_tokens=60)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [5]  # over budget alone, never cut
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 60
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_empty_positions_and_order(hf_backend):
    requests = random_requests(3, seed=4)
    requests.insert(1, ScoreRequest(teacher_input_ids=[5, 6, 7], teacher_positions=np.array([], dtype=np.int64)))
    results = hf_backend.score(requests)
    assert results[1].topk_ids.shape == (0, TOP_K) and results[1].label_logprobs.shape == (0,)
    for request, result in zip(requests, results):
        assert result.topk_ids.shape[0] == len(request.teacher_positions)


@pytest.mark.parametrize(
    ("positions", "ids", "message"),
    [
        ([0, 2], [5, 6, 7], r"request 0: teacher_positions must lie in \[1, 2\]"),
        ([3], [5, 6, 7], r"request 0: teacher_positions must lie in \[1, 2\]"),
        ([1], [5, 6, MODEL_VOCAB_SIZE], r"request 0: token ids must lie in \[0, 320\)"),
    ],
)
def test_bad_requests_raise(hf_backend, positions, ids, message):
    with pytest.raises(ScoreRequestError, match=message):
        hf_backend.score([ScoreRequest(teacher_input_ids=ids, teacher_positions=np.array(positions))])


def test_too_long_request_raises(hf_backend):
    ids = list(range(4, 300)) * 4  # 1184 tokens > max_position_embeddings 1024
    with pytest.raises(ScoreRequestError, match="request 0: scoring position 1183 needs 1184 tokens"):
        hf_backend.score([ScoreRequest(teacher_input_ids=ids, teacher_positions=np.array([1183]))])


def test_top_k_larger_than_vocab_raises(tiny_teacher_dir):
    with pytest.raises(TeacherConfigError, match=r"teacher.top_k=321 exceeds the vocabulary .* \(320 logits\)"):
        load_teacher(model=str(tiny_teacher_dir), backend="hf", top_k=321, device="cpu")


def test_unloadable_model_raises(tiny_teacher_dir):
    # teacher.backend / teacher.dtype values are refused by config validation (tests/pipeline/test_config.py).
    with pytest.raises(TeacherConfigError, match="cannot be loaded by transformers"):
        load_teacher(model=str(tiny_teacher_dir / "missing"), backend="hf", top_k=4)


def test_shared_prefix_runs_once_and_scores_like_each_request_alone(hf_backend):
    """Requests sharing a 100-token prefix (a shot set) are scored on one prefix forward's past_key_values,
    in suffix batches of mixed lengths, and equal the same requests scored one by one (no reuse)."""
    from kd.teacher.shared_prefix import shared_prefix_groups

    rng = np.random.default_rng(5)
    prefix = rng.integers(4, 300, size=100).tolist()
    requests = []
    for suffix_length in (6, 15, 9, 20):
        ids = prefix + rng.integers(4, 300, size=suffix_length).tolist()
        requests.append(ScoreRequest(ids, np.arange(len(ids) - 4, len(ids))[::-1].copy()))
    requests.append(ScoreRequest(rng.integers(4, 300, size=30).tolist(), np.array([5, 29])))  # no shared prefix
    arrays = [(np.asarray(r.teacher_input_ids), np.asarray(r.teacher_positions)) for r in requests]
    assert shared_prefix_groups(arrays, list(range(5))) == [([0, 1, 2, 3], 100)]
    together = hf_backend.score(requests, temperatures=[2.0])
    for request, result in zip(requests, together):
        alone = hf_backend.score([request], temperatures=[2.0])[0]
        np.testing.assert_array_equal(result.topk_ids, alone.topk_ids)
        np.testing.assert_allclose(result.topk_logprobs, alone.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.label_logprobs, alone.label_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.log_normalizers, alone.log_normalizers, atol=1e-4, rtol=0)


def test_shared_prefix_path_draws_the_same_sampled_targets(hf_backend):
    """Sampled draws depend on (seed, sample key, position) only: the shared-prefix path gives each request the
    same unique ids and counts as scoring it alone."""
    from kd.teacher.types import SamplingSpec

    rng = np.random.default_rng(6)
    prefix = rng.integers(4, 300, size=80).tolist()
    requests = []
    for key, suffix_length in enumerate((7, 12, 9)):
        ids = prefix + rng.integers(4, 300, size=suffix_length).tolist()
        requests.append(ScoreRequest(ids, np.arange(len(ids) - 5, len(ids)), sample_key=1000 + key))
    spec = SamplingSpec(draws=16, temperature=1.5, seed=3)
    together = hf_backend.score(requests, sampling=spec)
    for request, result in zip(requests, together):
        alone = hf_backend.score([request], sampling=spec)[0]
        assert result.sampled_counts.sum(axis=1).tolist() == [16] * 5
        np.testing.assert_array_equal(result.sampled_ids, alone.sampled_ids)
        np.testing.assert_array_equal(result.sampled_counts, alone.sampled_counts)
