"""Stage-one throughput: ``pipeline cache-teacher``'s scoring path against the same engine's plain loops.

``vllm`` is measured by :mod:`bench.stage_one_span` (span path vs prompt_logprobs vs prefill-only, with and
without shared shot sets, two K, the hf span path beside them, peak memory per condition). For ``hf`` and
each shot count, on the same prompts (the teacher sequences stage one builds, cut after
the last scored position as stage one sends them), three conditions run interleaved, ``repeats`` rounds after
one untimed warm-up round, with ONE engine per backend (its start is reported, not timed into throughput):

- ``cache_teacher``: stage one's own path — score, parse the top-K, write and commit the Zarr parts
  (:func:`stages.cache_teacher.score_shard` on every shard, then the completion record).
- ``prompt_logprobs``: the engine's plain prompt-logprob loop, nothing parsed or written. vLLM:
  ``generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False))`` (default
  dict-form logprobs); hf: ``model(ids).logits`` → fp32 ``log_softmax`` → ``topk`` at every position.
- ``prefill``: prefill only, no logprobs. vLLM: ``SamplingParams(max_tokens=1, detokenize=False)``; hf: the
  decoder forward alone (no lm_head).

Throughput unit: teacher (prompt) tokens per second; scored positions per second for the pipeline too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import BenchResult, ratio, spread
from bench.stage_one_span import measure_vllm_scorings
from bench.workspace import BenchSettings, bench_config, config_record

CONDITIONS = ("cache_teacher", "prompt_logprobs", "prefill")


def _prompts(plan) -> list[list[int]]:
    """Teacher token ids as stage one sends them (tokens after the last scored position are not computed)."""
    prompts = []
    for shard in plan.shards:
        for sample in shard:
            positions = np.asarray(sample.pair.teacher_positions)
            prompts.append(list(sample.pair.teacher_input_ids[: int(positions.max()) + 1]))
    return prompts


def _run_pipeline(plan) -> None:
    """Stage one's scoring path with this process's already-loaded engine (no engine start)."""
    from cache_schema import CacheWriter
    from stages.cache_teacher import score_shard

    path = plan.cfg.cache.path
    shutil.rmtree(path, ignore_errors=True)
    writer = CacheWriter(path, plan.meta, len(plan.shards), top_k=plan.cfg.teacher.top_k,
                         vocab_size=plan.vocab_size, overwrite=True, logprob_dtype=plan.cfg.cache.logprob_dtype)
    with writer:
        for part_id, shard in enumerate(plan.shards):
            score_shard(plan.cfg.teacher, plan.cfg.seed, path, part_id, shard)
        writer.finalize()


class _HFLoops:
    """The plain transformers loops on the model stage one loaded (same length-sorted batches)."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def run(self, condition: str, prompts: list[list[int]]) -> None:
        import torch

        from kd.teacher.hf_backend import length_sorted_batches

        b = self.backend
        with torch.inference_mode():
            for batch in length_sorted_batches([len(p) for p in prompts], b.teacher.max_batch_tokens):
                longest = max(len(prompts[i]) for i in batch)
                ids = torch.zeros((len(batch), longest), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, index in enumerate(batch):
                    ids[row, : len(prompts[index])] = torch.tensor(prompts[index])
                    mask[row, : len(prompts[index])] = 1
                ids, mask = ids.to(b.device), mask.to(b.device)
                if condition == "prefill":
                    b.decoder(input_ids=ids, attention_mask=mask)
                else:
                    logits = b.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
                    torch.topk(torch.log_softmax(logits, dim=-1), b.top_k, dim=-1)


def _load_engine(cfg) -> tuple[Any, float]:
    from stages.cache_teacher import _worker_backend

    started = time.perf_counter()
    backend, _ = _worker_backend(cfg.teacher, cfg.seed, 0)
    return backend, time.perf_counter() - started


def _close_engines() -> None:
    from stages.cache_teacher import _WORKER_BACKENDS

    for backend in _WORKER_BACKENDS.values():
        backend.close()
    _WORKER_BACKENDS.clear()


def _measure_backend(settings: BenchSettings, backend_name: str) -> dict[str, Any]:
    from stages.cache_teacher import setup

    plans = {}
    for shots in settings.shots:
        path = Path(settings.work_dir) / "stage_one" / f"{backend_name}-{shots}shot"
        cfg = bench_config(settings, f"teacher.backend={backend_name}", f"data.num_fewshot={shots}",
                           f"data.max_samples={settings.stage_one_samples}", f"cache.path={path}",
                           f"cache.shard_size={settings.stage_one_samples}")
        plans[shots] = setup(cfg, overwrite=True)
    try:
        backend, start_seconds = _load_engine(plans[settings.shots[0]].cfg)
        loops = _HFLoops(backend)
        seconds: dict[tuple[int, str], list[float]] = {(s, c): [] for s in settings.shots for c in CONDITIONS}
        for round_index in range(settings.repeats + 1):  # round 0 is the warm-up
            for shots, plan in plans.items():
                prompts = _prompts(plan)
                for condition in CONDITIONS:
                    started = time.perf_counter()
                    _run_pipeline(plan) if condition == "cache_teacher" else loops.run(condition, prompts)
                    if round_index:
                        seconds[(shots, condition)].append(time.perf_counter() - started)
    finally:
        _close_engines()
    out: dict[str, Any] = {"engine_start_s": round(start_seconds, 2), "shots": {}}
    for shots, plan in plans.items():
        prompts = _prompts(plan)
        tokens = sum(len(p) for p in prompts)
        positions = sum(len(s.pair.teacher_positions) for shard in plan.shards for s in shard)
        row: dict[str, Any] = {"samples": len(prompts), "teacher_tokens": tokens, "scored_positions": positions,
                               "mean_prompt_tokens": round(tokens / len(prompts), 1)}
        for condition in CONDITIONS:
            row[condition] = {"tokens_per_s": spread([tokens / s for s in seconds[(shots, condition)]]),
                              "seconds": spread(seconds[(shots, condition)])}
        row["cache_teacher"]["scored_positions_per_s"] = spread(
            [positions / s for s in seconds[(shots, "cache_teacher")]])
        pipeline = row["cache_teacher"]["tokens_per_s"]["median"]
        row["ratios"] = {
            "cache_teacher_over_prompt_logprobs": ratio(pipeline, row["prompt_logprobs"]["tokens_per_s"]["median"]),
            "cache_teacher_over_prefill": ratio(pipeline, row["prefill"]["tokens_per_s"]["median"]),
            "prompt_logprobs_over_prefill": ratio(row["prompt_logprobs"]["tokens_per_s"]["median"],
                                                  row["prefill"]["tokens_per_s"]["median"])}
        out["shots"][str(shots)] = row
    return out


def run_stage_one(settings: BenchSettings) -> BenchResult:
    """Every backend in settings.backends; vLLM needs the caller's ``if __name__ == "__main__":`` guard."""
    cfg = bench_config(settings)
    result = BenchResult("stage_one", config_record(cfg), settings.as_dict(),
                         units={"tokens_per_s": "teacher prompt tokens per second (median over repeats)",
                                "scored_positions_per_s": "distilled positions per second",
                                "seconds": "wall seconds per pass over all samples",
                                "engine_start_s": "seconds, one engine load (not in any throughput)",
                                "peak_rss_mb": "MiB, Σ VmHWM of this process and its engine processes",
                                "peak_extra_mb": "MiB, Σ (VmHWM − RSS before the condition) over the same",
                                "rel_spread": "(max - min) / median over repeats",
                                "ratios": "medians divided (dimensionless)"},
                         notes=["Conditions run interleaved on one engine per backend: warm-up round, then "
                                f"{settings.repeats} timed rounds.",
                                "vllm: rows (shots, data.fewshot_sets, K) of the span path, the plain "
                                "prompt_logprobs loop, prefill-only and the hf span path on engines loaded once "
                                "(bench/stage_one_span.py); peak_extra_mb = high-water RSS over the loaded "
                                "engines' RSS, summed over this process and the engine processes.",
                                "cache_teacher = score + parse top-K + write/commit Zarr parts (stage one's own "
                                "code path); prompt_logprobs and prefill only call the engine."])
    started = time.perf_counter()
    for backend_name in settings.backends:
        if backend_name == "vllm":  # the vLLM scorings (span, prompt_logprobs, prefill) with the hf span path
            result.results[backend_name] = measure_vllm_scorings(settings)
        else:
            result.results[backend_name] = _measure_backend(settings, backend_name)
    result.seconds = round(time.perf_counter() - started, 1)
    return result
