"""Stage one on `teacher.backend=server` against fake vLLM servers (fast; the real server tests are slow).

Covers what the real tests cannot cheaply: what the cache records, a server that dies mid-run with and without a
second one to take over, and the CLI's one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from cache_schema import open_cache, peek_cache_state, read_part_commit, validate_cache
from kd.errors import TeacherServerError
from kd.tokenizer import load_tokenizer
from pipeline.cli import main
from pipeline.inspect import cache_summary, format_summary
from stages.cache_teacher import cache_teacher
from tests.helpers.fake_vllm_server import FakeServer, dense_scores, install_fake_servers
from tests.helpers.stage_helpers import TINY_FAST, assert_caches_equal, tiny_config

URL_A, URL_B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
SERVER = ["teacher.backend=server", "teacher.server.retries=1", "teacher.server.backoff_s=0"]


def server_config(root, *urls: str, extra: tuple[str, ...] = ()):
    return tiny_config(root, *SERVER, f"teacher.server.urls=[{','.join(urls)}]", *extra)


def fake(cfg, url: str, **behaviour) -> FakeServer:
    behaviour = {"model_name": cfg.teacher.model, **behaviour}
    return FakeServer(url=url, tokenizer=load_tokenizer(cfg.teacher.model), vocab_size=512, **behaviour)


def quiet(*_args) -> None:
    pass


def test_stage_one_records_the_server_and_stores_its_scores(monkeypatch, tmp_path):
    cfg = server_config(tmp_path, URL_A)
    install_fake_servers(monkeypatch, [fake(cfg, URL_A)])
    summary = cache_teacher(cfg, workers=0, progress=False, echo=quiet)
    cache = open_cache(cfg.cache.path)
    validate_cache(cache, deep=True)
    assert summary["samples"] == 24 and cache.meta["backend"] == "server"
    assert cache.meta["teacher_server"] == {"model_name": cfg.teacher.model, "vllm_version": "0.32.0",
                                            "max_model_len": 2048}
    assert f"(server; served as {cfg.teacher.model} by vLLM 0.32.0)" in format_summary(cache_summary(cfg.cache.path))
    # every server down: a complete matching cache still needs nothing; a changed config still needs a server
    install_fake_servers(monkeypatch, [fake(cfg, URL_A, refuse_connections=True)])
    assert cache_teacher(cfg, workers=0, progress=False, echo=quiet).get("nothing_to_do")
    with pytest.raises(TeacherServerError, match="no teacher server answers"):
        cache_teacher(server_config(tmp_path / "other", URL_A), workers=0, progress=False, echo=quiet)
    sample = cache[5]
    topk_ids, topk_logprobs, labels = dense_scores(sample["teacher_input_ids"], sample["teacher_positions"], 512, 8)
    np.testing.assert_array_equal(sample["topk_ids"], topk_ids)
    np.testing.assert_allclose(sample["topk_logprobs"], topk_logprobs, atol=1e-2)  # float16 storage
    np.testing.assert_allclose(sample["label_logprobs"], labels, atol=1e-5)


def test_a_server_dying_mid_run_keeps_committed_parts_and_the_resumed_cache_is_identical(monkeypatch, tmp_path):
    reference_cfg = server_config(tmp_path / "reference", URL_A)
    install_fake_servers(monkeypatch, [fake(reference_cfg, URL_A)])
    cache_teacher(reference_cfg, workers=0, progress=False, echo=quiet)

    cfg = server_config(tmp_path / "killed", URL_A)
    # 2 start-up probes (stage one's setup, the backend), then part 0's 8 samples; part 1 finds it dead.
    server = fake(cfg, URL_A, die_after=2 + 8)
    install_fake_servers(monkeypatch, [server])
    with pytest.raises(TeacherServerError, match="every teacher server failed: http://10.0.0.1:8000"):
        cache_teacher(cfg, workers=0, progress=False, echo=quiet)
    assert peek_cache_state(cfg.cache.path)[0] == "incomplete"
    assert read_part_commit(cfg.cache.path, 0) is not None and read_part_commit(cfg.cache.path, 1) is None

    server.die_after = None  # restarted
    lines: list[str] = []
    summary = cache_teacher(cfg, workers=0, progress=False, echo=lines.append)
    assert any("resuming" in line for line in lines) and summary["parts_reused"] == 1
    assert_caches_equal(reference_cfg.cache.path, cfg.cache.path)


def test_a_second_server_takes_over_the_dead_ones_work(monkeypatch, tmp_path):
    reference_cfg = server_config(tmp_path / "reference", URL_A)
    install_fake_servers(monkeypatch, [fake(reference_cfg, URL_A)])
    cache_teacher(reference_cfg, workers=0, progress=False, echo=quiet)
    cfg = server_config(tmp_path / "two", URL_A, URL_B)
    first, second = fake(cfg, URL_A, die_after=2 + 5), fake(cfg, URL_B)
    install_fake_servers(monkeypatch, [first, second])
    cache_teacher(cfg, workers=0, progress=False, echo=quiet)
    assert first.completions == 7 and second.completions > 2
    assert_caches_equal(reference_cfg.cache.path, cfg.cache.path)


@pytest.mark.parametrize(("behaviour", "overrides", "message"), [
    ({"model_name": "someone-else"}, (), "serves ['someone-else'], not"),
    ({"max_logprobs": 4}, (), "allows at most 4 prompt logprobs"),
    ({"refuse_connections": True}, (), "no teacher server answers"),
    ({}, ("teacher.server.urls=[]",), "teacher.server.urls: teacher.backend=server needs at least one server URL"),
])
def test_cli_errors_are_one_line_exit_2_and_nothing_is_written(monkeypatch, tmp_path, capsys, behaviour,
                                                               overrides, message):
    cfg = server_config(tmp_path, URL_A)
    install_fake_servers(monkeypatch, [fake(cfg, URL_A, **behaviour)])
    code = main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", *TINY_FAST, *SERVER,
                 f"teacher.server.urls=[{URL_A}]", f"cache.path={cfg.cache.path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert peek_cache_state(cfg.cache.path)[0] == "absent"
