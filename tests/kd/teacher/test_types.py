"""Shared scoring types: vLLM flat prompt-logprob parsing, BackendUnavailableError, request validation."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from kd.errors import BackendUnavailableError, TeacherConfigError
from kd.teacher.types import ScoreRequest, ScoreRequestError, check_no_temperatures, checked_request_arrays
from kd.teacher.vllm_backend import parse_prompt_logprobs
from tests.helpers.tiny_teacher import load_teacher


def Logprob(logprob: float, rank: int) -> SimpleNamespace:  # noqa: N802 - mimics vllm.logprobs.Logprob
    return SimpleNamespace(logprob=logprob, rank=rank)


def flat_logprobs(per_position: list[list[tuple[int, float, int]]]) -> SimpleNamespace:
    """Mimic vllm.logprobs.FlatLogprobs: per position a list of (token_id, logprob, rank), actual token first."""
    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[], ranks=[])
    for entries in per_position:
        flat.start_indices.append(len(flat.token_ids))
        for token, logprob, rank in entries:
            flat.token_ids.append(token)
            flat.logprobs.append(logprob)
            flat.ranks.append(rank)
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_parse_flat_prompt_logprobs_orders_by_rank_and_keeps_label():
    prompt_logprobs = flat_logprobs(
        [
            [],  # position 0: nothing predicts the first token
            [(9, -5.0, 7), (3, -0.1, 1), (4, -1.0, 2), (5, -2.0, 3)],  # actual token 9 outside the top-3
            [(4, -0.5, 1), (5, -3.0, 3), (4, -0.5, 1), (6, -1.5, 2)],  # actual in top-K, ranks out of order
        ]
    )
    prompt = np.array([1, 9, 4])
    ids, logprobs, labels = parse_prompt_logprobs(prompt_logprobs, prompt, np.array([2, 1]), top_k=3, request_index=0)
    np.testing.assert_array_equal(ids, [[4, 6, 5], [3, 4, 5]])
    np.testing.assert_array_equal(logprobs, np.array([[-0.5, -1.5, -3.0], [-0.1, -1.0, -2.0]], np.float32))
    np.testing.assert_array_equal(labels, np.array([-0.5, -5.0], np.float32))
    assert ids.dtype == np.int64 and logprobs.dtype == np.float32


def test_parse_refuses_missing_ranks():
    prompt_logprobs = flat_logprobs([[], [(9, -5.0, 7), (3, -0.1, 1), (5, -2.0, 3)]])
    with pytest.raises(RuntimeError, match=r"request 4: vLLM returned ranks \[1\] at position 1, expected 1..2"):
        parse_prompt_logprobs(prompt_logprobs, np.array([1, 9]), np.array([1]), top_k=2, request_index=4)


def test_parse_refuses_misaligned_actual_token():
    prompt_logprobs = flat_logprobs([[], [(9, -5.0, 7), (3, -0.1, 1)]])
    with pytest.raises(RuntimeError, match="request 0: vLLM prompt logprobs at position 1 do not start with the"):
        parse_prompt_logprobs(prompt_logprobs, np.array([1, 3]), np.array([1]), top_k=1, request_index=0)


def test_parse_dict_form_uses_actual_token_and_rank():
    entry = {3: Logprob(-0.1, 1), 9: Logprob(-5.0, 7), 4: Logprob(-1.0, 2)}
    ids, logprobs, labels = parse_prompt_logprobs([None, entry], np.array([1, 9]), np.array([1]), 2, 0)
    np.testing.assert_array_equal(ids, [[3, 4]])
    np.testing.assert_array_equal(labels, np.array([-5.0], np.float32))


def test_vllm_import_failure_raises_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(BackendUnavailableError) as raised:
        load_teacher(model=str(tmp_path), backend="vllm", top_k=8)
    message = str(raised.value)
    assert message.startswith("teacher.backend=vllm but vLLM is not importable (ModuleNotFoundError")
    assert message.endswith("install it (make install) or use teacher.backend=hf")


def test_checked_request_arrays_accepts_lists_and_rejects_float_positions():
    ids, positions = checked_request_arrays(ScoreRequest([1, 2, 3], np.array([2, 1])), 0, vocab_size=10)
    assert ids.dtype == np.int64 and positions.tolist() == [2, 1]
    with pytest.raises(ScoreRequestError, match="request 3: teacher_positions must be a 1-D integer array"):
        checked_request_arrays(ScoreRequest([1, 2, 3], np.array([1.0])), 3, vocab_size=10)


def test_a_top_k_only_backend_refuses_log_normalizers():
    check_no_temperatures((), "vllm")
    with pytest.raises(TeacherConfigError, match=r"teacher.backend=vllm returns top-K logprobs at τ=1 only .* τ=2, 5"):
        check_no_temperatures((2.0, 5.0), "vllm")
