"""Server backend against fake vLLM servers (httpx.MockTransport): parsing, checks, retries, failover.

The real `vllm serve` tests are in tests/stages/test_cache_teacher_server.py (slow).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kd.config import ServerConfig, TeacherConfig
from kd.errors import TeacherConfigError, TeacherServerError
from kd.teacher.factory import load_backend
from kd.teacher.server_backend import parse_json_prompt_logprobs
from kd.teacher.types import ScoreRequest
from kd.tokenizer import load_tokenizer
from pipeline.config_loader import ASSETS_DIR
from tests.helpers.fake_vllm_server import FakeServer, dense_scores, install_fake_servers

TEACHER = str(ASSETS_DIR / "tiny" / "teacher")
VOCAB = 512
TOP_K = 8
URL_A, URL_B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEACHER, "teacher.model")


def teacher_config(*urls: str, top_k: int = TOP_K, **server_fields) -> TeacherConfig:
    server = ServerConfig(urls=list(urls), retries=2, backoff_s=0.0, max_in_flight=3, **server_fields)
    return TeacherConfig(model=TEACHER, backend="server", top_k=top_k, server=server)


def fake(tokenizer, url: str = URL_A, **behaviour) -> FakeServer:
    return FakeServer(url=url, model_name=TEACHER, tokenizer=tokenizer, vocab_size=VOCAB, **behaviour)


def requests_of(count: int, seed: int = 0) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        ids = rng.integers(5, VOCAB, size=int(rng.integers(4, 30)))
        positions = rng.permutation(np.arange(int(rng.integers(1, len(ids))), len(ids)))
        requests.append(ScoreRequest(ids.tolist(), positions))
    return requests


def assert_dense(requests, results) -> None:
    for request, result in zip(requests, results, strict=True):
        ids, positions = np.asarray(request.teacher_input_ids), np.asarray(request.teacher_positions)
        topk_ids, topk_logprobs, labels = dense_scores(ids, positions, VOCAB, TOP_K)
        np.testing.assert_array_equal(result.topk_ids, topk_ids)
        np.testing.assert_allclose(result.topk_logprobs, topk_logprobs, atol=1e-6)
        np.testing.assert_allclose(result.label_logprobs, labels, atol=1e-6)


def test_scores_match_the_dense_model_and_only_needed_tokens_are_sent(monkeypatch, tokenizer):
    server = fake(tokenizer)
    install_fake_servers(monkeypatch, [server])
    backend = load_backend(teacher_config(URL_A))
    requests = requests_of(12) + [ScoreRequest([5, 6, 7, 8, 9], np.array([2]))]
    results = backend.score(requests)
    assert_dense(requests, results)
    assert backend.vocab_size == VOCAB and backend.max_len == 2048 - 1  # one token is generated
    assert [5, 6, 7] in server.prompts  # tokens after max(tp) are not sent
    empty = backend.score([ScoreRequest([5, 6], np.array([], np.int64))])[0]
    assert empty.topk_ids.shape == (0, TOP_K)


def test_parser_handles_the_label_inside_and_outside_the_top_k():
    inside = {"7": {"logprob": -0.1, "rank": 1}, "9": {"logprob": -2.5, "rank": 2}}
    outside = {"7": {"logprob": -0.1, "rank": 1}, "9": {"logprob": -2.5, "rank": 2}, "4": {"logprob": -9.0, "rank": 40}}
    ids, _, labels = parse_json_prompt_logprobs([None, inside, outside], np.array([3, 9, 4]),
                                                       np.array([1, 2]), 2, "test")
    np.testing.assert_array_equal(ids, [[7, 9], [7, 9]])
    np.testing.assert_allclose(labels, [-2.5, -9.0])
    with pytest.raises(RuntimeError, match="lack the prompt token 5"):
        parse_json_prompt_logprobs([None, inside], np.array([3, 5]), np.array([1]), 2, "test")


def test_work_is_shared_and_a_server_dying_mid_run_loses_nothing(monkeypatch, tokenizer, caplog):
    first, second = fake(tokenizer, URL_A, die_after=3), fake(tokenizer, URL_B)
    install_fake_servers(monkeypatch, [first, second])
    backend = load_backend(teacher_config(URL_A, URL_B))
    requests = requests_of(20, seed=1)
    with caplog.at_level(logging.WARNING):
        results = backend.score(requests)
    assert_dense(requests, results)
    # each server answered one start-up probe; the first died after 2 of the 20 requests, the second did the rest
    assert first.completions == 3 and second.completions == 1 + 18
    assert URL_A in backend.gone and "given up" in caplog.text


def test_retries_on_5xx_then_succeeds(monkeypatch, tokenizer):
    server = fake(tokenizer)
    install_fake_servers(monkeypatch, [server])
    backend = load_backend(teacher_config(URL_A))
    server.failures_before_success = 2  # retries=2: the third attempt answers
    requests = requests_of(1, seed=2)
    assert_dense(requests, backend.score(requests))
    assert server.attempts == 1 + 3


def test_an_unreachable_server_is_skipped_and_all_gone_is_one_clear_error(monkeypatch, tokenizer):
    live = fake(tokenizer, URL_B)
    install_fake_servers(monkeypatch, [fake(tokenizer, URL_A, refuse_connections=True), live])
    backend = load_backend(teacher_config(URL_A, URL_B))
    assert [s.url for s in backend.served] == [URL_B]
    live.refuse_connections = True
    with pytest.raises(TeacherServerError, match=r"every teacher server failed: http://10.0.0.2:8000 \(ConnectError"):
        backend.score(requests_of(2))
    with pytest.raises(TeacherServerError, match="no teacher server answers"):
        load_backend(teacher_config(URL_A, URL_B))


@pytest.mark.parametrize(("behaviour", "config", "message"), [
    ({"model_name": "other-model"}, {}, r"serves \['other-model'\], not '.*teacher'; .*served-model-name"),
    ({"max_logprobs": 4}, {}, r"allows at most 4 prompt logprobs .* teacher.top_k=8; restart it with --max-logprobs 8"),
    ({"tokenize_offset": 1}, {}, r"tokenizes differently from teacher.model"),
    ({}, {"model_name": "served-as"}, r"serves \['.*teacher'\], not 'served-as'"),
])
def test_mismatched_servers_are_refused_before_scoring(monkeypatch, tokenizer, behaviour, config, message):
    server = FakeServer(url=URL_A, tokenizer=tokenizer, vocab_size=VOCAB, **{"model_name": TEACHER, **behaviour})
    install_fake_servers(monkeypatch, [server])
    with pytest.raises(TeacherConfigError, match=message):
        load_backend(teacher_config(URL_A, **config))
    assert server.completions == 0


def test_servers_on_different_vllm_versions_are_refused(monkeypatch, tokenizer):
    install_fake_servers(monkeypatch, [fake(tokenizer, URL_A), fake(tokenizer, URL_B, version="0.31.0")])
    with pytest.raises(TeacherConfigError, match="differ in vLLM version"):
        load_backend(teacher_config(URL_A, URL_B))
