"""Stage one's vLLM scorings side by side: the span path against ``prompt_logprobs`` and prefill-only.

Three engines are loaded once and kept (their starts are reported, never timed into a throughput):

- ``span``: :class:`kd.teacher.vllm_span.VLLMSpanTeacherBackend` (pooling runner, hidden states, the teacher's
  lm_head + log-softmax + top-K at the scored rows only, prefix cache on) — ``backend.score`` as stage one calls it;
- ``prompt_logprobs``: the plain vLLM loop ``generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=K,
  detokenize=False))`` on a generate engine (dict-form logprobs, nothing parsed; prefix cache off: vLLM never
  reads it for prompt-logprob requests);
- ``prefill``: the same generate engine with ``max_tokens=1`` and no logprobs;
- ``hf_span``: the hf backend's ``score`` (transformers forward, lm_head only at the scored rows).

For each plan (shots, ``data.fewshot_sets``) and each K, every condition runs on the same token sequences (the
teacher sequences stage one builds, cut after the last scored position), interleaved: a short warm-up on a few
requests, then ``repeats`` timed passes. The span engine's prefix cache is reset before each pass, so a pass
only reuses what it computed itself (the shared shot sets), never a previous pass.

Peak memory: the kernel's high-water mark (VmHWM) of this process and of every process under it (the vLLM
engine cores), reset to the current RSS (``/proc/<pid>/clear_refs``) right before the condition and read right
after. ``peak_extra_mb`` is Σ(high-water − RSS before) over those processes: what the condition needed on top
of the loaded engines; ``peak_rss_mb`` is Σ high-water (idle engines included).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil

from bench.records import ratio, spread
from bench.workspace import BenchSettings, bench_config

SPAN_PLANS = ((0, 0), (8, 0), (8, 16))
"""(data.num_fewshot, data.fewshot_sets) of the measured plans."""
SPAN_TOP_KS = (64, 16)
K_CONDITIONS = ("span", "prompt_logprobs", "hf_span")
PLAN_CONDITIONS = ("prefill",)
WARMUP_REQUESTS = 4
LONG_CONTEXT_TOKENS = 4000
"""Context of the long-prompt condition (scale teacher: 4,096 positions); its last 32 tokens are scored."""
MIB = 2**20


def _tree_pids() -> list[int]:
    return [os.getpid()] + [child.pid for child in psutil.Process().children(recursive=True)]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class TreePeak:
    """High-water RSS of this process tree over a ``with`` block (Linux /proc)."""

    def __enter__(self) -> Self:
        self.pids = _tree_pids()
        self.before = {pid: _status_kib(pid, "VmRSS") for pid in self.pids}
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        return self

    def __exit__(self, *_: object) -> None:
        self.high = {pid: _status_kib(pid, "VmHWM") for pid in self.pids}

    def record(self) -> dict[str, float]:
        extra = sum(max(0, self.high[pid] - self.before[pid]) for pid in self.pids)
        return {"peak_rss_mb": round(sum(self.high.values()) / 1024, 1), "peak_extra_mb": round(extra / 1024, 1)}


class Engines:
    """The span engine, the generate engine (prompt_logprobs / prefill) and the hf backend, loaded once."""

    def __init__(self, settings: BenchSettings) -> None:
        from kd.teacher.hf_backend import HFTeacherBackend
        from kd.teacher.vllm_backend import VLLMTeacherBackend
        from kd.teacher.vllm_span import VLLMSpanTeacherBackend

        teacher = bench_config(settings, f"teacher.top_k={max(SPAN_TOP_KS)}").teacher
        self.start_s: dict[str, float] = {}
        started = time.perf_counter()
        self.span = VLLMSpanTeacherBackend(teacher, seed=0)
        self.start_s["span"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        self.generate = VLLMTeacherBackend(teacher, seed=0)
        self.start_s["prompt_logprobs"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        self.hf = HFTeacherBackend(teacher)
        self.start_s["hf_span"] = round(time.perf_counter() - started, 2)

    def close(self) -> None:
        for backend in (self.span, self.generate, self.hf):
            backend.close()

    def run(self, condition: str, requests: list, top_k: int) -> None:
        import vllm

        prompts = [{"prompt_token_ids": [int(t) for t in r.teacher_input_ids[: int(max(r.teacher_positions)) + 1]]}
                   for r in requests]
        if condition in ("prompt_logprobs", "prefill"):
            params = vllm.SamplingParams(max_tokens=1, detokenize=False,
                                         prompt_logprobs=top_k if condition == "prompt_logprobs" else None)
            self.generate.llm.generate(prompts, params, use_tqdm=False)
            return
        backend = self.span if condition == "span" else self.hf
        if condition == "span":
            self.span.llm.reset_prefix_cache()  # a pass reuses only what it computed itself
        backend.top_k = top_k  # both read top_k per call; the engines were built for the largest K
        backend.score(requests)


def _plan_requests(settings: BenchSettings, shots: int, sets: int) -> list:
    from kd.teacher.types import ScoreRequest
    from stages.cache_teacher import setup

    path = Path(settings.work_dir) / "stage_one_span" / f"{shots}shot-{sets}sets"
    cfg = bench_config(settings, f"data.num_fewshot={shots}", f"data.fewshot_sets={sets}",
                       f"data.max_samples={settings.stage_one_samples}", f"cache.path={path}")
    plan = setup(cfg, overwrite=True)
    return [ScoreRequest(np.asarray(s.pair.teacher_input_ids), np.asarray(s.pair.teacher_positions))
            for shard in plan.shards for s in shard]


def _timed(engines: Engines, condition: str, requests: list, top_k: int, repeats: int) -> dict[str, Any]:
    engines.run(condition, requests[:WARMUP_REQUESTS], top_k)
    seconds, peaks = [], []
    for _ in range(repeats):
        with TreePeak() as peak:
            started = time.perf_counter()
            engines.run(condition, requests, top_k)
            seconds.append(time.perf_counter() - started)
        peaks.append(peak.record())
    tokens = sum(int(max(r.teacher_positions)) + 1 for r in requests)
    return {"tokens_per_s": spread([tokens / s for s in seconds]), "seconds": spread(seconds),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in peaks),
            "peak_extra_mb": max(p["peak_extra_mb"] for p in peaks)}


def _row_ratios(row: dict[str, Any]) -> dict[str, float | None]:
    def median(name: str) -> float | None:
        return row[name]["tokens_per_s"]["median"]

    return {"span_over_prompt_logprobs": ratio(median("span"), median("prompt_logprobs")),
            "span_over_prefill": ratio(median("span"), median("prefill")),
            "hf_span_over_prompt_logprobs": ratio(median("hf_span"), median("prompt_logprobs")),
            "span_peak_extra_over_prompt_logprobs": ratio(row["span"]["peak_extra_mb"],
                                                          row["prompt_logprobs"]["peak_extra_mb"])}


def _long_prompt(engines: Engines, requests: list) -> dict[str, Any]:
    """One teacher prompt of ~LONG_CONTEXT_TOKENS tokens (the plan's sequences joined), last 32 tokens scored."""
    from kd.teacher.types import ScoreRequest

    length = min(LONG_CONTEXT_TOKENS, engines.span.max_len - 1, engines.generate.max_len - 1)
    ids = np.concatenate([np.asarray(r.teacher_input_ids) for r in requests])
    ids = np.resize(ids, length)  # repeats the joined sequences if they are shorter
    request = [ScoreRequest(ids, np.arange(length - 32, length))]
    out: dict[str, Any] = {"context_tokens": length, "scored_positions": 32}
    for condition in K_CONDITIONS:
        with TreePeak() as peak:
            started = time.perf_counter()
            engines.run(condition, request, max(SPAN_TOP_KS))
            seconds = time.perf_counter() - started
        out[condition] = {"seconds": round(seconds, 3), **peak.record()}
    out["span_peak_extra_over_prompt_logprobs"] = ratio(out["span"]["peak_extra_mb"],
                                                        out["prompt_logprobs"]["peak_extra_mb"])
    return out


def measure_vllm_scorings(settings: BenchSettings) -> dict[str, Any]:
    """Rows (shots, fewshot_sets, K) × conditions, interleaved on engines loaded once, plus the long prompt."""
    plans = {(shots, sets): _plan_requests(settings, shots, sets) for shots, sets in SPAN_PLANS}
    engines = Engines(settings)
    try:
        rows: dict[str, dict[str, Any]] = {}
        for (shots, sets), requests in plans.items():
            tokens = sum(int(max(r.teacher_positions)) + 1 for r in requests)
            plan_figures = {c: _timed(engines, c, requests, max(SPAN_TOP_KS), settings.repeats)
                            for c in PLAN_CONDITIONS}
            for top_k in SPAN_TOP_KS:
                row: dict[str, Any] = {"shots": shots, "fewshot_sets": sets, "top_k": top_k,
                                       "samples": len(requests), "teacher_tokens": tokens,
                                       "scored_positions": int(sum(len(r.teacher_positions) for r in requests)),
                                       "mean_prompt_tokens": round(tokens / len(requests), 1), **plan_figures}
                for condition in K_CONDITIONS:
                    row[condition] = _timed(engines, condition, requests, top_k, settings.repeats)
                row["ratios"] = _row_ratios(row)
                rows[f"{shots}-shot, sets={sets}, K={top_k}"] = row
        long_prompt = _long_prompt(engines, plans[SPAN_PLANS[1]])
    finally:
        engines.close()
    return {"engine_start_s": engines.start_s, "rows": rows, "long_prompt": long_prompt,
            "goals": _goals(rows)}


def _goals(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The issue's goal ratios at K=64 (span path over the plain prompt_logprobs loop, prefill, memory)."""
    def row(shots: int, sets: int) -> dict[str, Any]:
        return rows[f"{shots}-shot, sets={sets}, K={max(SPAN_TOP_KS)}"]

    return {"span_over_prompt_logprobs_8shot": row(8, 0)["ratios"]["span_over_prompt_logprobs"],
            "span_over_prompt_logprobs_0shot": row(0, 0)["ratios"]["span_over_prompt_logprobs"],
            "span_over_prefill_8shot": row(8, 0)["ratios"]["span_over_prefill"],
            "span_sets16_over_prompt_logprobs_8shot": ratio(row(8, 16)["span"]["tokens_per_s"]["median"],
                                                            row(8, 0)["prompt_logprobs"]["tokens_per_s"]["median"]),
            "span_peak_extra_over_prompt_logprobs_8shot": row(8, 0)["ratios"][
                "span_peak_extra_over_prompt_logprobs"]}
