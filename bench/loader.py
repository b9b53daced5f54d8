"""Loader headroom: what the streaming cache loader delivers alone, over what stage-two training consumes.

Interleaved per repeat, in this process, on the same cache and batch size: (a) a fresh
:class:`kd.training.loader.CacheStream` drained for ``loader_batches`` batches by
:func:`kd.training.loader.measure_loader` (one untimed warm-up batch); (b) ``loader_batches`` KD training
steps of stage two (after ``warmup_steps`` untimed ones, once), whose samples and tokens per second are what
training consumes. Headroom = (a) / (b): above 1 the loader is not the bottleneck (with one core for it).
(c) the loader alone on the same samples stored with the ``compact`` top-K encoding, interleaved with (a):
compact / plain is the decoding cost of the smaller cache.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from bench.records import BenchResult, ratio, spread
from bench.stage_two import time_training_steps, training_overrides
from bench.workspace import BenchSettings, bench_config, config_record, training_cache


def _loader_once(cache_path: str, cfg, pad_id: int, batches: int) -> dict[str, float]:
    from cache_schema import open_cache
    from kd.training.loader import CacheStream, measure_loader
    from kd.training.training_data import split_indices

    cache = open_cache(cache_path)
    train_idx, _ = split_indices(len(cache), cfg.train.num_validation_samples, cfg.seed)
    with CacheStream(cache, [int(i) for i in train_idx], batch_size=cfg.train.batch_size, seed=cfg.seed,
                     shuffle=True, pad_id=pad_id) as stream:
        return measure_loader(stream, batches)


def run_loader(settings: BenchSettings) -> BenchResult:
    from stages.train_student import setup

    started = time.perf_counter()
    cfg, cache_path = training_cache(settings)
    _, compact_path = training_cache(settings, encoding="compact")
    compact_runs: list[dict[str, float]] = []
    output_dir = tempfile.mkdtemp(prefix="bench-loader-")
    loader_runs, train_runs = [], []
    try:
        steps = settings.warmup_steps + settings.loader_batches * settings.repeats
        train_cfg = bench_config(settings, "teacher.backend=hf", f"teacher.top_k={cfg.teacher.top_k}",
                                 *training_overrides(cache_path, output_dir, steps))
        plan = setup(train_cfg, overwrite=True, say=lambda *_: None)
        try:
            time_training_steps(plan, settings.warmup_steps)
            next_step = settings.warmup_steps + 1
            for _ in range(settings.repeats):
                loader_runs.append(_loader_once(cache_path, train_cfg, plan.pad_id, settings.loader_batches))
                compact_runs.append(_loader_once(compact_path, train_cfg, plan.pad_id, settings.loader_batches))
                times, tokens = time_training_steps(plan, settings.loader_batches, first_step=next_step)
                next_step += settings.loader_batches
                seconds = sum(times)
                train_runs.append({"samples_per_s": settings.loader_batches * train_cfg.train.batch_size / seconds,
                                   "tokens_per_s": tokens / seconds})
        finally:
            plan.stream.close()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    results: dict[str, Any] = {
        "loader": {k: spread([r[k] for r in loader_runs]) for k in ("samples_per_s", "tokens_per_s", "batches_per_s")},
        "loader_compact": {k: spread([r[k] for r in compact_runs])
                           for k in ("samples_per_s", "tokens_per_s", "batches_per_s")},
        "training": {k: spread([r[k] for r in train_runs]) for k in ("samples_per_s", "tokens_per_s")}}
    results["compact_over_plain"] = ratio(results["loader_compact"]["samples_per_s"]["median"],
                                          results["loader"]["samples_per_s"]["median"])
    results["headroom"] = {
        "samples": ratio(results["loader"]["samples_per_s"]["median"], results["training"]["samples_per_s"]["median"]),
        "tokens": ratio(results["loader"]["tokens_per_s"]["median"], results["training"]["tokens_per_s"]["median"])}
    result = BenchResult("loader", config_record(train_cfg), settings.as_dict(), results=results,
                         units={"samples_per_s": "samples per second",
                                "tokens_per_s": "student tokens (non-pad) per second",
                                "batches_per_s": "batches per second",
                                "headroom": "loader alone / training consumption (dimensionless, medians)",
                                "compact_over_plain": "loader samples/s on the compact cache / on the plain one"},
                         notes=[f"batch_size={train_cfg.train.batch_size}, {settings.loader_batches} batches per "
                                f"repeat, {settings.repeats} repeats interleaved with as many KD training steps."])
    result.seconds = round(time.perf_counter() - started, 1)
    return result
